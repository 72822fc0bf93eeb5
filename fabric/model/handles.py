"""IPAM records stored in etcd: allocations and the handles that own them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from fabric.model import checks

# Handles are etcd key segments (`ipam/handles/<handle>`, `workloads/<node>/<handle>`):
# no '/', and short enough that every key built from one stays readable.
MAX_HANDLE = 253
_HANDLE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{MAX_HANDLE - 1}}}$")


class IpamError(Exception):
    """An allocation request we cannot serve; the message says why."""


class Exhausted(IpamError):
    """No free address is left where this node may allocate."""


class HandleElsewhere(IpamError):
    """The handle (container ID and interface) is held on another node."""


class InUse(IpamError):
    """An address a registered workload still uses; the message names the workload."""


def check_handle(handle: str) -> str:
    """Handles become etcd key segments, so they may not contain '/' or be empty."""
    if not isinstance(handle, str) or not _HANDLE.fullmatch(handle):
        raise IpamError(f"invalid handle {handle!r}: use letters, digits and _.:@- "
                        f"(no '/'), at most {MAX_HANDLE} characters")
    return handle


@dataclass(frozen=True)
class Allocation:
    address: str
    block: str
    pool: str
    borrowed: bool = False

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def host_prefix(self) -> str:
        return f"{self.address}/{128 if self.family == 6 else 32}"

    def to_record(self) -> dict[str, Any]:
        return {"address": self.address, "block": self.block, "pool": self.pool,
                "borrowed": self.borrowed}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Allocation:
        """Raises ValueError naming the field that is not what an allocation needs: a
        release or a check computes with these (the address's offset in its block)."""
        value = checks.record(value, "allocation")
        address = checks.address(value.get("address"), "address")
        block = checks.network(value.get("block"), "block")
        if ipaddress.ip_address(address) not in ipaddress.ip_network(block):
            raise ValueError(f"address {address} is not in its block {block}")
        return cls(address, block, checks.text(value.get("pool"), "pool"),
                   checks.flag(value.get("borrowed"), "borrowed"))


@dataclass(frozen=True)
class Handle:
    """Who holds which addresses; one per container interface."""

    handle: str
    node: str
    allocations: tuple[Allocation, ...]
    attrs: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"handle": self.handle, "node": self.node, "attrs": dict(self.attrs),
                "allocations": [a.to_record() for a in self.allocations]}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Handle:
        """Raises ValueError naming the field that is not what a handle needs."""
        value = checks.record(value, "handle record")
        allocations = value.get("allocations", [])
        if not isinstance(allocations, list):
            raise ValueError(f"allocations {allocations!r} is not a list")
        attrs = checks.record(value.get("attrs") or {}, "attrs")
        return cls(checks.text(value.get("handle"), "handle"),
                   checks.text(value.get("node"), "node"),
                   tuple(Allocation.from_record(a) for a in allocations),
                   {str(k): str(v) for k, v in attrs.items()})

    def addresses(self) -> tuple[str, ...]:
        return tuple(a.address for a in self.allocations)

    def families(self) -> set[int]:
        return {a.family for a in self.allocations}

    def without(self, address: str) -> Handle:
        return Handle(self.handle, self.node,
                      tuple(a for a in self.allocations if a.address != address), self.attrs)
