"""Nodes and workloads as registered in etcd: the records and their parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    asn: int
    labels: dict[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    started_at: float = 0.0
    version: str = ""

    @property
    def is_route_reflector(self) -> bool:
        return self.rr_cluster_id is not None

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "asn": self.asn,
                "labels": dict(self.labels), "rr_cluster_id": self.rr_cluster_id,
                "started_at": self.started_at, "version": self.version}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Node:
        return cls(str(value["name"]), str(value["address"]), int(value["asn"]),
                   {str(k): str(v) for k, v in (value.get("labels") or {}).items()},
                   value.get("rr_cluster_id"), float(value.get("started_at", 0.0)),
                   str(value.get("version", "")))


@dataclass(frozen=True)
class Workload:
    handle: str
    node: str
    container_id: str
    ifname: str
    netns: str
    ips: tuple[str, ...]
    name: str | None = None
    host_ifname: str | None = None
    created_at: float = 0.0
    network: str = ""  # the CNI network name: GC of one network leaves others alone

    def to_record(self) -> dict[str, Any]:
        return {"handle": self.handle, "node": self.node, "container_id": self.container_id,
                "ifname": self.ifname, "netns": self.netns, "ips": list(self.ips),
                "name": self.name, "host_ifname": self.host_ifname,
                "created_at": self.created_at, "network": self.network}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Workload:
        return cls(str(value["handle"]), str(value["node"]), str(value["container_id"]),
                   str(value["ifname"]), str(value.get("netns", "")),
                   tuple(str(i) for i in value.get("ips", [])), value.get("name"),
                   value.get("host_ifname"), float(value.get("created_at", 0.0)),
                   str(value.get("network", "")))
