"""l3fabric host side: the agent, kernel route handling, the operator CLI and the lab.

The shared foundations every other package stands on live here too: etcd settings
(`settings`), the datastore adapter (`datastore`), its key layout (`keys`) and logging
(`logs`).
"""

__version__ = "0.1.0"
