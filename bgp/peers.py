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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerSpec

Kind = Literal["mesh", "reflector", "rr-client", "global", "node-specific"]
DEFAULT_AS = 64512
_PEER_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Peer:
    """One BGP session of this node, as ExaBGP will be configured: one per neighbor
    address, carrying the routes of that address's family."""

    address: str
    asn: int
    kind: Kind
    name: str
    password: str | None = None
    max_prefixes: int | None = None

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4


def peers_for(me: Node, nodes: Iterable[Node], specs: Iterable[PeerSpec],
              config: BgpConfig) -> dict[str, Peer]:
    """The sessions of `me`, keyed by the neighbor's address.

    Two nodes have a session for each family both have an underlay address of; a
    configured peer is a session when this node has an address of its family.
    """
    others = [n for n in nodes if n.name != me.name and n.address != me.address]
    peers: dict[str, Peer] = {}

    def add(node: Node, kind: Kind) -> None:
        for family in me.families:
            address = node.address_of(family)
            if address:
                peers[address] = Peer(address, node.asn, kind, node.name)

    if config.node_mesh:
        reflectors = [n for n in others if n.is_route_reflector]
        if not reflectors and not me.is_route_reflector:
            for node in others:
                add(node, "mesh")
        elif me.is_route_reflector:
            for node in others:
                add(node, "reflector" if node.is_route_reflector else "rr-client")
        else:
            for node in reflectors:
                add(node, "reflector")
    mine = {me.address_of(f) for f in me.families}
    for spec in specs:
        family = 6 if ":" in spec.address else 4
        if spec.address in mine or family not in me.families or not spec.applies_to(me):
            continue
        spec_kind: Kind = "node-specific" if spec.node else (
            "reflector" if spec.route_reflector else "global")
        peers[spec.address] = Peer(spec.address, spec.asn, spec_kind, spec.name, spec.password,
                                   spec.max_prefixes)
    return peers
