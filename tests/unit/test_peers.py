"""Who peers with whom."""

from __future__ import annotations

import pytest

from bgp.peers import peers_for
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerError, PeerSpec, parse_peer

A = Node("a", "192.0.2.1", 64512, {"rack": "r1"})
B = Node("b", "192.0.2.2", 64512, {"rack": "r2"})
C = Node("c", "192.0.2.3", 64512, {"rack": "r1"})
RR = Node("rr", "192.0.2.4", 64512, rr_cluster_id="1.1.1.1")


def kinds(peers):
    return {p.address: p.kind for p in peers.values()}


def test_full_mesh_excludes_self():
    assert kinds(peers_for(A, [A, B, C], [], BgpConfig())) == {
        "192.0.2.2": "mesh", "192.0.2.3": "mesh"}


def test_route_reflector_nodes():
    assert kinds(peers_for(A, [A, B, RR], [], BgpConfig())) == {"192.0.2.4": "reflector"}
    assert kinds(peers_for(RR, [A, B, RR], [], BgpConfig())) == {
        "192.0.2.1": "rr-client", "192.0.2.2": "rr-client"}


def test_global_selector_and_node_peers_without_mesh():
    specs = [PeerSpec("tor1", "192.0.2.254", 65101, node_selector={"rack": "r1"}),
             PeerSpec("tor2", "192.0.2.253", 65102, node_selector={"rack": "r2"}),
             PeerSpec("special", "192.0.2.250", 65200, node="b"),
             PeerSpec("rr", "192.0.2.251", 64512, route_reflector=True)]
    config = BgpConfig(node_mesh=False)
    assert kinds(peers_for(A, [A, B, C], specs, config)) == {
        "192.0.2.254": "global", "192.0.2.251": "reflector"}
    assert kinds(peers_for(B, [A, B, C], specs, config)) == {
        "192.0.2.253": "global", "192.0.2.250": "node-specific", "192.0.2.251": "reflector"}


def test_explicit_peer_wins_over_mesh_entry():
    specs = [PeerSpec("b-direct", "192.0.2.2", 64512, password="s3cret")]
    peers = peers_for(A, [A, B], specs, BgpConfig())
    assert peers["192.0.2.2"].kind == "global" and peers["192.0.2.2"].password == "s3cret"


@pytest.mark.parametrize("args, message", [
    (("Bad Name", "192.0.2.1", 1), "peer name"),
    (("tor", "nope", 1), "not an IP address"),
    (("tor", "192.0.2.1", 0), "out of range"),
])
def test_parse_peer_errors(args, message):
    with pytest.raises(PeerError, match=message):
        parse_peer(*args)
