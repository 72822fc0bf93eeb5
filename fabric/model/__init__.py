"""The records every package shares, and their parsing: no I/O, no clients.

Nodes and workloads (`nodes`), IP pools (`pools`), address blocks (`blocks`), IPAM
handles and allocations (`handles`), the fabric's BGP settings and configured peers
(`peers`), and prefixes as integers (`prefix`). `bgp`, `ipam`, `cni` and the agent all
import these; none of them imports etcd3, gRPC or pyroute2 (a unit test checks), so
every decision built on them can be tested without a datastore or a kernel.
"""
