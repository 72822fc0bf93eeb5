"""A claimed address block as stored in etcd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fabric.model import checks


@dataclass(frozen=True)
class Block:
    """A claimed block as stored in etcd."""

    cidr: str
    pool: str
    affinity: str | None  # node name; None once released from a host

    def to_record(self) -> dict[str, Any]:
        return {"cidr": self.cidr, "pool": self.pool, "affinity": self.affinity}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Block:
        """Raises ValueError naming the field that is not what a block needs."""
        value = checks.record(value)
        affinity = value.get("affinity")
        return cls(checks.network(value.get("cidr"), "cidr"),
                   checks.text(value.get("pool"), "pool"),
                   None if affinity is None else checks.text(affinity, "affinity"))
