"""Nodes and workloads as registered in etcd: the records and their parsing."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from fabric.model import checks


@dataclass(frozen=True)
class Node:
    """A node of the fabric.

    `address` is its underlay address and its identity: IPv4 when it has one, else its
    IPv6 address (an IPv6-only node). `address6` is its IPv6 underlay address when it
    has one (the same as `address` on an IPv6-only node). BGP runs per family between
    the addresses two nodes share: IPv4 routes over IPv4 sessions, IPv6 routes over
    IPv6 sessions, as Calico does.
    """

    name: str
    address: str
    asn: int
    labels: dict[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    started_at: float = 0.0
    version: str = ""
    address6: str = ""
    router_id: str = ""  # BGP identifier (IPv4 form); derived when empty, see `bgp_id`
    # The networks its underlay addresses sit in (10.99.0.0/24): no IP pool may overlap
    # them, or a block would swallow the hosts' own segment (its gateway, etcd...).
    networks: tuple[str, ...] = ()

    @property
    def is_route_reflector(self) -> bool:
        return self.rr_cluster_id is not None

    @property
    def ipv4(self) -> str:
        return "" if ":" in self.address else self.address

    @property
    def ipv6(self) -> str:
        return self.address6 or (self.address if ":" in self.address else "")

    def address_of(self, family: int) -> str:
        """Its underlay address of `family` (4 or 6), or "" when it has none."""
        return self.ipv6 if family == 6 else self.ipv4

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(f for f in (4, 6) if self.address_of(f))

    @property
    def bgp_id(self) -> str:
        """The BGP identifier: the configured one, else the IPv4 address, else the low 32
        bits of the IPv6 address (unique among the addresses of one underlay subnet)."""
        if self.router_id:
            return self.router_id
        if self.ipv4:
            return self.ipv4
        return str(ipaddress.IPv4Address(int(ipaddress.IPv6Address(self.ipv6)) & 0xFFFFFFFF))

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "asn": self.asn,
                "labels": dict(self.labels), "rr_cluster_id": self.rr_cluster_id,
                "started_at": self.started_at, "version": self.version,
                "address6": self.address6, "router_id": self.router_id,
                "networks": list(self.networks)}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Node:
        """Raises ValueError naming the field that is not what a node needs."""
        value = checks.record(value)
        cluster = value.get("rr_cluster_id")
        return cls(checks.text(value.get("name"), "name"),
                   checks.address(value.get("address"), "address"),
                   checks.asn(value.get("asn")),
                   {str(k): str(v) for k, v in _mapping(value.get("labels"), "labels")},
                   None if cluster is None else checks.ipv4(cluster, "rr_cluster_id"),
                   _number(value.get("started_at", 0.0), "started_at"),
                   str(value.get("version", "")),
                   checks.ipv6(value.get("address6"), "address6", empty_ok=True),
                   checks.ipv4(value.get("router_id"), "router_id", empty_ok=True),
                   tuple(checks.network(n, "networks entry")
                         for n in _sequence(value.get("networks"), "networks")))


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
    namespace: str = ""  # for network policy ("" reads as "default")
    labels: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"handle": self.handle, "node": self.node, "container_id": self.container_id,
                "ifname": self.ifname, "netns": self.netns, "ips": list(self.ips),
                "name": self.name, "host_ifname": self.host_ifname,
                "created_at": self.created_at, "network": self.network,
                "namespace": self.namespace, "labels": dict(self.labels)}

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Workload:
        """Raises ValueError naming the field that is not what a workload needs."""
        value = checks.record(value)
        ips = value.get("ips", [])
        if not isinstance(ips, list):
            raise ValueError(f"ips {ips!r} is not a list")
        for ip in ips:
            checks.address(str(ip).partition("/")[0], "ips entry")
        return cls(checks.text(value.get("handle"), "handle"),
                   checks.text(value.get("node"), "node"),
                   checks.text(value.get("container_id"), "container_id", empty_ok=True),
                   checks.text(value.get("ifname"), "ifname", empty_ok=True),
                   checks.text(value.get("netns", ""), "netns", empty_ok=True),
                   tuple(str(i) for i in ips), checks.optional_text(value.get("name"), "name"),
                   checks.optional_text(value.get("host_ifname"), "host_ifname"),
                   _number(value.get("created_at", 0.0), "created_at"),
                   checks.text(value.get("network", ""), "network", empty_ok=True),
                   checks.text(value.get("namespace") or "", "namespace", empty_ok=True),
                   {str(k): str(v) for k, v in _mapping(value.get("labels"), "labels")})


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} {value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return float(value)


def _sequence(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what} {value!r} is not a list")
    return value


def _mapping(value: Any, what: str) -> list[tuple[Any, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ValueError(f"{what} {value!r} is not a mapping")
    return list(value.items())
