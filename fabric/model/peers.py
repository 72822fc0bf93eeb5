"""The fabric's BGP settings and configured peers, as stored in etcd."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.model import checks
from fabric.model.nodes import Node

DEFAULT_AS = 64512
_PEER_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
# Printable ASCII without space, '"', ';', '{' or '}': ExaBGP's configuration carries the
# password as `md5-password "...";`, and one such character in one record would break
# the file on every node. 80 characters is the kernel's TCP MD5 key limit.
_SAFE_PASSWORD = re.compile(r"[!#-:<-z|~]{1,80}")


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
        mesh = value.get("node_mesh", True)
        if not isinstance(mesh, bool):
            raise ValueError(f"node_mesh {mesh!r} is not true or false")
        return cls(checks.asn(value.get("asn", DEFAULT_AS)), mesh)

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
        """Raises ValueError naming the field that is not what a peer needs."""
        value = checks.record(value)
        limit = value.get("max_prefixes")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"max_prefixes {limit!r} is not a count of at least 1")
        password = value.get("password")
        if password is not None:
            check_password(password)
        selector = value.get("node_selector") or {}
        if not isinstance(selector, dict):
            raise ValueError(f"node_selector {selector!r} is not a mapping")
        node = value.get("node")
        return cls(checks.text(value.get("name"), "name"),
                   checks.address(value.get("address"), "address"),
                   checks.asn(value.get("asn")),
                   None if node is None else checks.text(node, "node"),
                   {str(k): str(v) for k, v in selector.items()},
                   password, limit, bool(value.get("route_reflector", False)))

    def applies_to(self, node: Node) -> bool:
        if self.node is not None:
            return self.node == node.name
        return all(node.labels.get(k) == v for k, v in self.node_selector.items())


def check_password(password: Any) -> str:
    """The password when ExaBGP's configuration and the kernel can carry it."""
    if not isinstance(password, str) or not _SAFE_PASSWORD.fullmatch(password):
        raise PeerError("password: use 1 to 80 printable characters without space, "
                        "quotes, ';' or braces (ExaBGP's configuration cannot carry them)")
    return password


def check_not_a_node(spec: PeerSpec, nodes: Iterable[Node]) -> None:
    """Refuse a configured peer at a node's own address.

    Every node already peers with every other in the mesh; a configured peer wins over
    the mesh session for the same address, so the other nodes would replace their
    working session to that node with one it never answers (wrong AS, or no
    matching configuration on its side).
    """
    for node in nodes:
        if _same_address(node.address, spec.address):
            raise PeerError(f"{spec.address} is the address of node {node.name}: nodes "
                            "peer with each other through the mesh already")


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def parse_peer(name: str, address: str, asn: int, **extra: Any) -> PeerSpec:
    if not _PEER_NAME.fullmatch(name):
        raise PeerError(f"peer name {name!r}: use lower-case letters, digits, '-' and '.'")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError as exc:
        raise PeerError(f"peer address {address!r} is not an IP address") from exc
    if not 1 <= asn <= 4294967295:
        raise PeerError(f"AS {asn} is out of range (1 to 4294967295)")
    if extra.get("password") is not None:
        check_password(extra["password"])
    limit = extra.get("max_prefixes")
    if limit is not None and limit < 1:
        raise PeerError("max-prefixes must be at least 1")
    return PeerSpec(name, str(parsed), asn, **extra)
