"""Network policy: from NetworkPolicy manifests to a host's nftables ruleset. Pure.

`fabric.model.policy` holds the records and the reference semantics; `compiler` turns
them into one host's rule model and nftables document, and reads a ruleset the kernel
listed back (to check it agrees with the model).
"""
