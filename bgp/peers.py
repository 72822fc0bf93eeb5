"""Who this node peers with, computed from etcd's registrations and peer records. Pure.

* Full mesh (the default): every registered node peers with every other.
* Route reflectors: nodes registered with a cluster id reflect; with any present, the
  mesh becomes "reflectors peer with all, the others only with reflectors".
* Global peers (a ToR or external reflector every node peers with, optionally only the
  nodes whose labels match a selector) and node-specific peers come from
  `fabricctl bgp peer add`.
* The mesh can be switched off (`fabricctl bgp config --no-mesh`), leaving only the
  configured peers: the AS-per-rack design with eBGP to each rack's ToR.

An explicitly configured peer wins over the mesh entry for the same address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fabric.registry import Node

Kind = Literal["mesh", "reflector", "rr-client", "global", "node-specific"]
DEFAULT_AS = 64512
_PEER_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class PeerError(ValueError):
    pass


@dataclass(frozen=True)
class BgpConfig:
    """Fabric-wide settings, `bgp/config` in etcd."""

    asn: int = DEFAULT_AS
    node_mesh: bool = True

    @classmethod
    def from_record(cls, value: Mapping[str, Any] | None) -> BgpConfig:
        if not value:
            return cls()
        return cls(int(value.get("asn", DEFAULT_AS)), bool(value.get("node_mesh", True)))

    def to_record(self) -> dict[str, Any]:
        return {"asn": self.asn, "node_mesh": self.node_mesh}


@dataclass(frozen=True)
class PeerSpec:
    """A configured peer, `bgp/peers/<name>` in etcd."""

    name: str
    address: str
    asn: int
    node: str | None = None  # only this node peers with it
    node_selector: dict[str, str] = field(default_factory=dict)  # only matching nodes
    password: str | None = None
    max_prefixes: int | None = None
    route_reflector: bool = False  # informational: shown as kind "reflector"

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "asn": self.asn,
                "node": self.node, "node_selector": dict(self.node_selector),
                "password": self.password, "max_prefixes": self.max_prefixes,
                "route_reflector": self.route_reflector}

    @classmethod
    def from_record(cls, value: Mapping[str, Any]) -> PeerSpec:
        return cls(str(value["name"]), str(value["address"]), int(value["asn"]),
                   value.get("node"), {str(k): str(v) for k, v in
                                       (value.get("node_selector") or {}).items()},
                   value.get("password"), value.get("max_prefixes"),
                   bool(value.get("route_reflector", False)))

    def applies_to(self, node: Node) -> bool:
        if self.node is not None:
            return self.node == node.name
        return all(node.labels.get(k) == v for k, v in self.node_selector.items())


def parse_peer(name: str, address: str, asn: int, **extra: Any) -> PeerSpec:
    import ipaddress

    if not _PEER_NAME.match(name):
        raise PeerError(f"peer name {name!r}: use lower-case letters, digits, '-' and '.'")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError as exc:
        raise PeerError(f"peer address {address!r} is not an IP address") from exc
    if not 1 <= asn <= 4294967295:
        raise PeerError(f"AS {asn} is out of range (1 to 4294967295)")
    password = extra.get("password")
    if password is not None and not 1 <= len(password) <= 80:
        raise PeerError("password must be 1 to 80 characters (TCP MD5 limit)")
    limit = extra.get("max_prefixes")
    if limit is not None and limit < 1:
        raise PeerError("max-prefixes must be at least 1")
    return PeerSpec(name, str(parsed), asn, **extra)


@dataclass(frozen=True)
class Peer:
    """One BGP neighbor of this node, as ExaBGP will be configured."""

    address: str
    asn: int
    kind: Kind
    name: str
    password: str | None = None
    max_prefixes: int | None = None

    @property
    def reflects_to(self) -> bool:
        """We are a route reflector and this neighbor is our client."""
        return self.kind == "rr-client"


def peers_for(me: Node, nodes: Iterable[Node], specs: Iterable[PeerSpec],
              config: BgpConfig) -> dict[str, Peer]:
    """The neighbors of `me`, keyed by address."""
    others = [n for n in nodes if n.name != me.name and n.address != me.address]
    peers: dict[str, Peer] = {}
    if config.node_mesh:
        reflectors = [n for n in others if n.is_route_reflector]
        if not reflectors and not me.is_route_reflector:
            for node in others:
                peers[node.address] = Peer(node.address, node.asn, "mesh", node.name)
        elif me.is_route_reflector:
            for node in others:
                kind: Kind = "reflector" if node.is_route_reflector else "rr-client"
                peers[node.address] = Peer(node.address, node.asn, kind, node.name)
        else:
            for node in reflectors:
                peers[node.address] = Peer(node.address, node.asn, "reflector", node.name)
    for spec in specs:
        if spec.address == me.address or not spec.applies_to(me):
            continue
        spec_kind: Kind = "node-specific" if spec.node else (
            "reflector" if spec.route_reflector else "global")
        peers[spec.address] = Peer(spec.address, spec.asn, spec_kind, spec.name, spec.password,
                                   spec.max_prefixes)
    return peers
