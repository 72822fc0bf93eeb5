"""fabric-agent, the daemon on every host: registration, BGP through ExaBGP, kernel
routes, the CNI and control sockets, DNS and metrics."""
