"""Node and workload registrations in etcd.

A node record stays until an operator removes the node (`fabricctl node rm`), as in
Calico: whether a node's routes are usable is BGP's business (hold timer, graceful
restart), and an etcd stall must never make every node vanish at once. Whether its
agent is alive is a separate key under the agent's lease (`liveness/<node>`), shown
by `fabricctl nodes` and by nothing else. A workload record is written by the CNI
handler after its addresses are allocated, in a transaction that compares the IPAM
handle still exists: GC can then never free an address whose workload registered
concurrently, and a workload is never registered with an address already freed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from fabric import logs
from fabric.model import checks
from fabric.model.nodes import Node, Workload
from fabric.store import keys
from fabric.store.datastore import Datastore, absent, delete, parsed, put, readable, unchanged
from fabric.store.errors import CorruptValue

T = TypeVar("T")


class RegistrationError(Exception):
    pass


class Registry:
    def __init__(self, store: Datastore) -> None:
        self.store = store
        self.log = logs.get("registry")

    # -- nodes -------------------------------------------------------------------------
    def _read_all(self, prefix: str, parse: Callable[[dict[str, Any]], T], kind: str
                  ) -> list[T]:
        return readable(self.store.list(prefix), parse, kind, self.log)

    def nodes(self) -> list[Node]:
        return sorted(self._read_all(keys.NODES, Node.from_record, "node"),
                      key=lambda n: n.name)

    def node(self, name: str) -> Node | None:
        entry = self.store.get(keys.node(name))
        return parsed(entry, Node.from_record, "node") if entry else None

    def register_node(self, node: Node) -> None:
        """Write our node record (no lease: it stays until the node is removed).

        Refused when another host (different underlay address) holds the name: two
        agents fighting over one name would announce each other's blocks. A value that
        is no node record (not JSON, unknown schema, or fields no node has) is nobody's:
        it is replaced.
        """
        key = keys.node(node.name)
        for _ in range(20):
            try:
                current = self.store.get(key)
            except CorruptValue:
                revision = self._revision(key)
                ok, _ = self.store.txn([unchanged(key, revision)], [put(key, node.to_record())])
                if ok:
                    return
                continue
            if current is not None:
                holder = _holder(current.value)
                if holder is not None and holder != node.address:
                    raise RegistrationError(
                        f"node name {node.name!r} is already registered by {holder}")
                compare = [unchanged(key, current.mod_revision)]
            else:
                compare = [absent(key)]
            ok, _ = self.store.txn(compare, [put(key, node.to_record())])
            if ok:
                return
        raise RegistrationError(f"could not register node {node.name!r}: concurrent writers")

    def _revision(self, key: str) -> int:
        """The mod revision of `key` whatever its value (0 when absent)."""
        return next((e.mod_revision for e in self.store.list(key, keys_only=True).entries
                     if e.key == key), 0)

    def remove_node(self, name: str) -> bool:
        """Forget a node (it left the fabric for good): its record and liveness key."""
        ok, _ = self.store.txn([], [delete(keys.node(name)), delete(keys.liveness(name))])
        return ok

    # -- workloads ---------------------------------------------------------------------
    def workloads(self, node: str | None = None) -> list[Workload]:
        prefix = keys.workloads_prefix(node) if node else keys.WORKLOADS
        return sorted(self._read_all(prefix, Workload.from_record, "workload"),
                      key=lambda w: (w.node, w.handle))

    def workload(self, node: str, handle: str) -> Workload | None:
        entry = self.store.get(keys.workload(node, handle))
        return parsed(entry, Workload.from_record, "workload") if entry else None

    def register_workload(self, workload: Workload) -> None:
        """Register only while the IPAM handle exists (see the module docstring)."""
        handle_key = keys.handle(workload.handle)
        entry = self.store.get(handle_key)
        if entry is None:
            raise RegistrationError(f"handle {workload.handle} holds no addresses")
        record = workload if workload.created_at else Workload(
            **{**workload.__dict__, "created_at": time.time()})
        ok, _ = self.store.txn([unchanged(handle_key, entry.mod_revision)],
                               [put(keys.workload(workload.node, workload.handle),
                                    record.to_record())])
        if not ok:
            raise RegistrationError(f"handle {workload.handle} changed while registering")

    def restore_workload(self, workload: Workload) -> bool:
        """Write a lost registration again while the IPAM handle exists; False when a
        usable one is there already. One that is no workload record (written by hand,
        by another version) is replaced: the agent ignores it, so the container's link
        would stay unexplained for good."""
        handle_entry = self.store.get(keys.handle(workload.handle))
        if handle_entry is None:
            return False
        key = keys.workload(workload.node, workload.handle)
        try:
            current = self.store.get(key)
            if current is not None:
                parsed(current, Workload.from_record, "workload")
                return False
        except CorruptValue:
            pass
        ok, _ = self.store.txn([unchanged(handle_entry.key, handle_entry.mod_revision),
                                unchanged(key, self._revision(key))],
                               [put(key, workload.to_record())])
        return ok

    def deregister_workload(self, node: str, handle: str) -> bool:
        ok, _ = self.store.txn([], [delete(keys.workload(node, handle))])
        return ok

    def find_workloads(self, name: str) -> list[Workload]:
        return [w for w in self.workloads() if w.name == name]


def _holder(value: dict[str, Any]) -> str | None:
    """The underlay address a node record names; None when it is no node record."""
    try:
        return Node.from_record(value).address
    except checks.NOT_A_RECORD:
        return None
