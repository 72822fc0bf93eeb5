"""IPv6 in the pure parts: sessions per family, ExaBGP's configuration, import policy,
the agent's state for a dual-stack and an IPv6-only node."""

from __future__ import annotations

import pytest

from bgp import api
from bgp.config import SpeakerSettings, environment, render
from bgp.peers import peers_for
from bgp.policy import NEXT_HOP, OWN_BLOCK, UNDERLAY, Origin, PolicyContext, evaluate
from fabric.agent import messages as m
from fabric.agent.clock import FakeClock
from fabric.agent.config import ConfigError, load
from fabric.agent.routing import Settings
from fabric.agent.state import MIRRORS, AgentState, Intervals
from fabric.model.blocks import Block
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import parse_pool
from fabric.model.prefix import Prefix

DUAL_A = Node("a", "192.0.2.1", 64512, address6="fd99::1")
DUAL_B = Node("b", "192.0.2.2", 64512, address6="fd99::2")
V4_C = Node("c", "192.0.2.3", 64512)
V6_D = Node("d", "fd99::4", 64512)


def test_node_addresses_and_bgp_identifier():
    assert (DUAL_A.ipv4, DUAL_A.ipv6, DUAL_A.families) == ("192.0.2.1", "fd99::1", (4, 6))
    assert (V6_D.ipv4, V6_D.ipv6, V6_D.families) == ("", "fd99::4", (6,))
    assert DUAL_A.bgp_id == "192.0.2.1"
    assert V6_D.bgp_id == "0.0.0.4"  # the low 32 bits of its IPv6 address
    assert Node("e", "fd99::5", 1, router_id="10.0.0.5").bgp_id == "10.0.0.5"
    assert Node.from_record(V6_D.to_record()) == V6_D
    assert Node.from_record({"name": "old", "address": "192.0.2.9", "asn": 1}).address6 == ""


def test_sessions_exist_per_family_both_nodes_have():
    peers = peers_for(DUAL_A, [DUAL_A, DUAL_B, V4_C, V6_D], [], BgpConfig())
    assert {a: p.family for a, p in peers.items()} == {
        "192.0.2.2": 4, "fd99::2": 6, "192.0.2.3": 4, "fd99::4": 6}
    only6 = peers_for(V6_D, [DUAL_A, V4_C, V6_D], [], BgpConfig())
    assert list(only6) == ["fd99::1"]  # c has no IPv6: no session with an IPv6-only node
    specs = [PeerSpec("tor4", "192.0.2.254", 65100), PeerSpec("tor6", "fd99::fe", 65100)]
    assert sorted(peers_for(V6_D, [V6_D], specs, BgpConfig(node_mesh=False))) == ["fd99::fe"]


def test_each_session_carries_its_family_from_its_own_address():
    peers = peers_for(DUAL_A, [DUAL_A, DUAL_B], [], BgpConfig())
    settings = SpeakerSettings("192.0.2.1", 64512, 9, 120, ["relay"], "192.0.2.1", "fd99::1")
    text = render(settings, peers, ["10.244.0.0/26", "fd00:244::/122"])
    v4 = text[text.index("neighbor 192.0.2.2 {"):text.index("neighbor fd99::2 {")]
    v6 = text[text.index("neighbor fd99::2 {"):]
    assert "family { ipv4 unicast; }" in v4 and "local-address 192.0.2.1;" in v4
    assert "route 10.244.0.0/26 next-hop self;" in v4 and "fd00:244" not in v4
    assert "family { ipv6 unicast; }" in v6 and "local-address fd99::1;" in v6
    assert "route fd00:244::/122 next-hop self;" in v6 and "10.244" not in v6
    assert "router-id 192.0.2.1;" in v6  # one BGP identifier for every session
    assert environment("192.0.2.1", "fd99::1")["exabgp.tcp.bind"] == "192.0.2.1 fd99::1"


def test_import_policy_judges_ipv6_by_the_ipv6_next_hop():
    ctx = PolicyContext.build(64512, [("fd00:244::/64", 122)], ["fd00:244::/122"],
                              ["fd99::1", "fd99::2"],
                              {"fd00:244::40/122": Origin("b", "192.0.2.2", 64512, "fd99::2")},
                              {})
    block = Prefix.parse("fd00:244::40/122")
    assert evaluate(block, "fd99::2", (), ctx) is None
    assert evaluate(block, "192.0.2.2", (), ctx) == NEXT_HOP  # the IPv4 address is wrong here
    assert evaluate(Prefix.parse("fd00:244::/122"), "fd99::2", (), ctx) == OWN_BLOCK
    assert evaluate(Prefix.parse("fd00:244::/64"), "fd99::2", (), ctx) == OWN_BLOCK
    ctx_u = PolicyContext.build(64512, [("fd99::/64", 122)], [], ["fd99::1"], {}, {})
    assert evaluate(Prefix.parse("fd99::/122"), "fd99::9", (), ctx_u) == UNDERLAY


def test_an_ipv6_only_node_routes_ipv6_blocks():
    state = AgentState(V6_D, FakeClock(), Settings(), Intervals())
    for name in MIRRORS:
        state.handle(m.Snapshot(name, {}))
    state.handle(m.Snapshot("nodes", {n.name: n.to_record() for n in (V6_D, DUAL_A)}))
    state.handle(m.Snapshot("pools", {"p": parse_pool("p", "fd00:244::/64").to_record()}))
    state.handle(m.Snapshot("blocks", {
        "1": Block("fd00:244::/122", "p", "d").to_record(),
        "2": Block("fd00:244::40/122", "p", "a").to_record()}))
    config = state.initial_config()
    assert "neighbor fd99::1 {" in config and "router-id 0.0.0.4;" in config
    state.handle(m.BgpEvent(0, api.PeerState("fd99::1", "up")))
    jobs = state.handle(m.BgpEvent(0, api.Update(
        "fd99::1", {"fd99::1": ["fd00:244::40/122"]}, [])))
    installed = [r for j in jobs if isinstance(j, m.ApplyRoutes) for r in j.replace]
    assert [(str(r.prefix), r.gateways) for r in installed] == [
        ("fd00:244::40/122", ("fd99::1",))]
    assert state.desired.wanted(Prefix.parse("fd00:244::/122")).type == "blackhole"
    routes = state.bgp_routes("fd99::1", "advertised")
    assert [(r["prefix"], r["next_hop"]) for r in routes] == [("fd00:244::/122", "fd99::4")]


def test_settings_take_an_ipv6_address_and_refuse_a_link_local_one():
    config = load(None, {"FABRIC_NODE_ADDRESS6": "fd99::4", "FABRIC_CONFIG": "/dev/null"})
    assert (config.address, config.node_address6) == ("fd99::4", "fd99::4")
    with pytest.raises(ConfigError, match="link-local"):
        load(None, {"FABRIC_NODE_ADDRESS6": "fe80::1", "FABRIC_CONFIG": "/dev/null"})
    with pytest.raises(ConfigError, match="a node address is required"):
        load(None, {"FABRIC_CONFIG": "/dev/null"})
