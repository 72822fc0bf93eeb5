"""`fabricctl`: the operator's tool. One module per command group."""
