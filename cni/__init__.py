"""The CNI plugin: how container runtimes attach containers to the fabric.

The executable a runtime runs (`shim`) is tiny and uses only the standard library:
it forwards the request to the node agent over a local socket and prints the answer,
because a Python process that imported pyroute2 and etcd3 on every exec would cost
250 ms per container. The agent, already connected to etcd and netlink, does the
work in `handler`, using the pure `spec` (versions, errors, results) and `netconf`
(network configuration) modules and the kernel helpers in `fabric.kernel.links`.
"""
