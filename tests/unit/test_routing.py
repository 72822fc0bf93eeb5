"""The routing controller's decisions, driven by events, without ExaBGP or a kernel.

The reconciler here is the real one, never started: its desired state is what the
controller asked for, and nothing is written to the kernel.
"""

from __future__ import annotations

import pytest

from bgp import api
from fabric.agent.routing import RoutingController
from fabric.kernel.reconciler import Reconciler
from fabric.kernel.routes import blackhole
from fabric.model.blocks import Block
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import parse_pool
from fabric.model.prefix import Prefix

A = Node("a", "192.0.2.1", 64512)
B = Node("b", "192.0.2.2", 64512)
C = Node("c", "192.0.2.3", 64512)


class Sent:
    """Stands in for the ExaBGP adapter: records the API commands sent."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def send(self, command: str) -> bool:
        self.commands.append(command)
        return True


@pytest.fixture
def ctl():
    controller = RoutingController(A, Reconciler(73), hold_time=9, graceful_restart=120,
                                   ecmp=False, max_prefixes=5, fixed_asn=None)
    controller.speaker = Sent()
    controller.set_state(nodes=(A, B, C), pools=(parse_pool("p", "10.244.0.0/16"),),
                         blocks=(Block("10.244.0.0/26", "p", "a"),
                                 Block("10.244.0.64/26", "p", "b")))
    return controller


def learned(ctl):
    return {str(p): r.gateways for p, r in ctl.reconciler.source("learned").items()}


def up(ctl, peer: str, restart: int | None = 120) -> None:
    ctl.on_event(api.Open(peer, restart, 9, peer))
    ctl.on_event(api.PeerState(peer, "up"))


def announce(ctl, peer: str, *prefixes: str, next_hop: str | None = None,
             path: tuple[int, ...] = ()) -> None:
    ctl.on_event(api.Update(peer, {next_hop or peer: list(prefixes)}, [],
                            api.Attributes(as_path=path)))


def test_peers_exports_and_blackholes_follow_etcd(ctl):
    assert sorted(ctl.peers) == ["192.0.2.2", "192.0.2.3"]
    assert ctl.exports == {"10.244.0.0/26"}
    assert ctl.reconciler.source("blackholes") == {
        Prefix.parse("10.244.0.0/26"): blackhole(Prefix.parse("10.244.0.0/26"))}
    text = ctl.render()
    assert "neighbor 192.0.2.2 {" in text and "route 10.244.0.0/26 next-hop self;" in text
    ctl.set_state(config=BgpConfig(node_mesh=False),
                  specs=(PeerSpec("tor", "192.0.2.254", 65100),))
    assert list(ctl.peers) == ["192.0.2.254"]
    ctl.set_state(borrowed={"10.244.0.70": "a"})
    assert ctl.exports == {"10.244.0.0/26", "10.244.0.70/32"}


def test_accepted_routes_reach_the_desired_kernel_state_rejected_do_not(ctl):
    up(ctl, "192.0.2.2")
    announce(ctl, "192.0.2.2", "10.244.0.64/26", "0.0.0.0/0", "10.244.0.0/26")
    assert learned(ctl) == {"10.244.0.64/26": ("192.0.2.2",)}
    status = {p["address"]: p for p in ctl.status()["peers"]}["192.0.2.2"]
    assert status["rejected_by_reason"] == {"default-route": 1, "own-block": 1}
    ctl.on_event(api.Update("192.0.2.2", {}, ["10.244.0.64/26"]))
    assert learned(ctl) == {}


def test_a_block_claimed_after_its_route_arrived_is_judged_again(ctl):
    up(ctl, "192.0.2.3")
    announce(ctl, "192.0.2.3", "10.244.0.128/26", next_hop="192.0.2.99")  # not c's block yet
    assert learned(ctl) == {"10.244.0.128/26": ("192.0.2.99",)}
    ctl.set_state(blocks=(*ctl.state.blocks, Block("10.244.0.128/26", "p", "c")))
    assert learned(ctl) == {}  # now known as c's: the next hop must be c
    reasons = {r["prefix"]: r["reason"] for r in ctl.routes(None, "rejected")}
    assert reasons == {"10.244.0.128/26": "next-hop-mismatch"}


def test_notification_drops_routes_silent_loss_keeps_them_stale(ctl):
    up(ctl, "192.0.2.2")
    announce(ctl, "192.0.2.2", "10.244.0.64/26")
    ctl.on_event(api.PeerState("192.0.2.2", "down", "closing connection"))
    assert learned(ctl) == {"10.244.0.64/26": ("192.0.2.2",)}  # graceful restart
    up(ctl, "192.0.2.2")
    ctl.on_event(api.EndOfRib("192.0.2.2", "ipv4 unicast"))  # not sent again: swept
    assert learned(ctl) == {}
    announce(ctl, "192.0.2.2", "10.244.0.64/26")
    ctl.on_event(api.PeerState("192.0.2.2", "down", "notification sent (4,0)"))
    assert learned(ctl) == {}
    session = {p["address"]: p for p in ctl.status()["peers"]}["192.0.2.2"]
    assert session["last_error"] == "notification sent (4,0) Hold Timer Expired"


def test_a_peer_without_graceful_restart_is_dropped_at_once(ctl):
    up(ctl, "192.0.2.2", restart=None)
    announce(ctl, "192.0.2.2", "10.244.0.64/26")
    ctl.on_event(api.PeerState("192.0.2.2", "down", "closing connection"))
    assert learned(ctl) == {}


def test_max_prefix_closes_the_session_and_keeps_nothing(ctl):
    up(ctl, "192.0.2.3")
    announce(ctl, "192.0.2.3", "10.244.1.0/26")
    announce(ctl, "192.0.2.3", *(f"10.244.{2 + i}.0/26" for i in range(6)))
    assert learned(ctl) == {}
    assert ctl.speaker.commands == ["neighbor 192.0.2.3 teardown 1"]
    session = {p["address"]: p for p in ctl.status()["peers"]}["192.0.2.3"]
    assert "max-prefix 5 exceeded" in session["last_error"]
    assert "neighbor 192.0.2.3 {" not in ctl.render()  # held down, out of ExaBGP's config


def test_a_route_reflector_passes_client_routes_to_other_clients():
    rr = Node("rr", "192.0.2.9", 64512, rr_cluster_id="1.1.1.1")
    ctl = RoutingController(rr, Reconciler(73), hold_time=9, graceful_restart=120,
                            ecmp=False, max_prefixes=100, fixed_asn=None)
    ctl.set_state(nodes=(rr, B, C), pools=(parse_pool("p", "10.244.0.0/16"),),
                  blocks=(Block("10.244.0.64/26", "p", "b"),))
    up(ctl, "192.0.2.2")
    announce(ctl, "192.0.2.2", "10.244.0.64/26")
    plan = ctl.static_plan()
    assert plan == {"192.0.2.2": set(), "192.0.2.3": {"10.244.0.64/26"}}
    assert ("route 10.244.0.64/26 next-hop 192.0.2.2 originator-id 192.0.2.2 "
            "cluster-list [ 1.1.1.1 ];") in ctl.render()
