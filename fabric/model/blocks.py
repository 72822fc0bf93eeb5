"""A claimed address block as stored in etcd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
        affinity = value.get("affinity")
        return cls(str(value["cidr"]), str(value["pool"]),
                   None if affinity is None else str(affinity))
