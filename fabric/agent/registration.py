"""The node's presence in etcd: its record (persistent) and its liveness (a lease).

The record says the node exists: it stays until an operator removes the node, so an
etcd stall longer than any lease cannot make nodes vanish (and their peers drop them)
all at once. The liveness key lives under a lease the agent keeps alive; it says the
agent is running, for `fabricctl nodes`. Both are written only from the agent's etcd
job worker (and once at start, before that worker runs); what to write and when is
decided by the owner loop (`fabric.agent.state`).
"""

from __future__ import annotations

import time
from typing import Any

from fabric import logs
from fabric.model.nodes import Node
from fabric.store import keys
from fabric.store.datastore import Datastore
from fabric.store.errors import DatastoreError
from fabric.store.registry import Registry


class Registration:
    def __init__(self, store: Datastore, name: str, ttl: int) -> None:
        self.store = store
        self.registry = Registry(store)
        self.name = name
        self.ttl = ttl
        self.log = logs.get("registration", node=name)
        self._lease: Any = None

    def register(self, node: Node) -> dict[str, Any]:
        """Write our record (raises RegistrationError when another host holds the name)."""
        self.registry.register_node(node)
        self.log.info("node registered", address=node.address, asn=node.asn)
        return {"address": node.address}

    def refresh(self) -> dict[str, Any]:
        """Keep the liveness key's lease alive; a lease that expired is made again."""
        granted = self.store.refresh(self._lease) if self._lease is not None else 0
        if granted <= 0:
            if self._lease is not None:
                self.log.warning("liveness lease expired; making a new one")
            self._lease = self.store.lease(self.ttl)
            self.store.put(keys.liveness(self.name), {"since": time.time()},
                           lease=self._lease)
            granted = self.ttl
        return {"ttl": granted}

    def withdraw_liveness(self) -> None:
        """Clean shutdown: the agent is not running any more (the record stays)."""
        if self._lease is None:
            return
        try:
            self.store.revoke(self._lease)
        except DatastoreError as exc:
            self.log.warning("could not revoke the liveness lease", error=str(exc))
