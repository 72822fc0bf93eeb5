"""The node's registration in etcd, kept alive by a lease.

The record disappears on its own when the agent is gone for longer than the lease's
TTL: peers then drop the node from their mesh and GC may give its empty blocks back.
If etcd was unreachable for so long that the lease expired, the next keep-alive finds
it gone and registers again under a new lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fabric import logs
from fabric.model.nodes import Node
from fabric.store.datastore import Datastore
from fabric.store.errors import DatastoreError
from fabric.store.registry import Registry


class Registration:
    def __init__(self, store: Datastore, node: Node, ttl: int) -> None:
        self.store = store
        self.registry = Registry(store)
        self.node = node
        self.ttl = ttl
        self.log = logs.get("registration", node=node.name)
        self._lease: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_refresh = 0.0
        self.healthy = False
        self.on_reregister: Callable[[], None] | None = None

    def register(self) -> None:
        """Register now (raises RegistrationError when another host holds the name)."""
        self._lease = self.store.lease(self.ttl)
        self.registry.register_node(self.node, self._lease)
        self.last_refresh = time.time()
        self.healthy = True
        self.log.info("node registered", address=self.node.address, asn=self.node.asn,
                      ttl=self.ttl)

    def update(self, node: Node) -> None:
        """Rewrite the record (e.g. the fabric AS changed) under the same lease."""
        self.node = node
        if self._lease is not None:
            self.registry.register_node(node, self._lease)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)
        self._thread.start()

    def stop(self, revoke: bool) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if revoke and self._lease is not None:
            try:
                self.store.revoke(self._lease)
                self.log.info("node registration removed")
            except DatastoreError as exc:
                self.log.warning("could not revoke lease", error=str(exc))

    def _run(self) -> None:
        interval = max(1.0, self.ttl / 3)
        while not self._stop.wait(interval):
            try:
                granted = self.store.refresh(self._lease) if self._lease is not None else 0
                if granted <= 0:
                    self.log.warning("lease expired; registering again")
                    self.register()
                    if self.on_reregister:
                        self.on_reregister()
                else:
                    self.last_refresh = time.time()
                    self.healthy = True
            except DatastoreError as exc:
                self.healthy = False
                self.log.warning("lease keep-alive failed", error=str(exc))
            except Exception:
                self.healthy = False
                self.log.exception("lease keep-alive failed")
