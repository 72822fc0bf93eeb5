"""l3fabric host side, one sub-package per job.

`model` holds the shared records (pure); `store` talks to etcd; `kernel` to netlink
(routes, links, namespaces); `agent` is the daemon on every host; `cli` is fabricctl;
`lab` builds a fabric in network namespaces on one machine. Beside them: etcd
settings (`settings`), logging (`logs`), local unix sockets (`sockets`) and stopping
processes we started (`processes`).
"""

__version__ = "0.1.0"
