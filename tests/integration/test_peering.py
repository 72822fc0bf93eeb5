"""Interoperation with BIRD 2 and FRR, and what the import policy keeps out.

Each scenario is its own lab: two or three hosts with real agents and ExaBGP, and a
real BIRD or FRR in its own namespace on the underlay.
"""

from __future__ import annotations

import pytest

from fabric.lab.peers import Bird, Frr, Neighbor, bird_config
from fabric.model.peers import PeerSpec
from fabric.store import keys
from tests.conftest import needs_root, running_lab
from tests.support.fabric import (
    agent,
    blocks_of,
    kernel_routes,
    sessions_established,
    status,
    wait_until,
)

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]


def speaker_table(lab) -> str:
    peer = lab.state.peer
    from pathlib import Path

    if peer.kind == "bird":
        return Bird(peer.netns, Path(peer.run_dir)).cli("show", "route")
    frr = Frr(peer.netns, Path(peer.run_dir), peer.netns)
    return frr.vtysh("show bgp ipv4 unicast") + frr.vtysh("show bgp ipv6 unicast")


@pytest.mark.parametrize("kind", ["bird", "frr"])
@pytest.mark.parametrize("role", ["rr", "tor"])
def test_routes_flow_both_ways_through_bird_and_frr(kind, role):
    """Dual stack: an IPv4 and an IPv6 session between each host and the speaker, each
    carrying its family (the configs are the ones docs/operations.md shows)."""
    with running_lab(pool="10.244.0.0/16", families=(4, 6), pool6="fd00:244::/64") as lab:
        lab.add_peer(kind, role)
        tor = role == "tor"
        for index, host in enumerate(("h1", "h2"), start=1):
            lab.add_host(host, asn=65000 + index if tor else None)
        for host in ("h1", "h2"):
            lab.wait_agent(host)
            lab.add_workload(host)
        blocks = blocks_of(lab)
        speaker = lab.state.peer
        for host in ("h1", "h2"):
            wait_until(lambda h=host: sessions_established(lab, h), f"{host} <-> {kind}", 30)
            peers = status(lab, host)["peers"]
            kind_ = "reflector" if role == "rr" else "global"
            assert sorted((p["address"], p["kind"], p["family"]) for p in peers) == sorted(
                [(speaker.address, kind_, "ipv4"), (speaker.address6, kind_, "ipv6")])
        for host, other in (("h1", "h2"), ("h2", "h1")):
            for family in (4, 6):
                block = next(c for c, o in blocks.items()
                             if o == other and (":" in c) == (family == 6))
                # Through a reflector the next hop stays the originating node; through a
                # ToR it is the ToR, or (FRR's third-party next hop on a shared segment,
                # RFC 4271 5.1.3) the originating node.
                owner = lab.state.hosts[other]
                vias = {f"via {owner.ipv6 if family == 6 else owner.ipv4}"}
                if tor:
                    vias.add(f"via {speaker.ipv6 if family == 6 else speaker.address}")
                wait_until(lambda h=host, b=block, v=vias, f=family: kernel_routes(
                    lab.state.hosts[h].netns, family=f).get(b) in v,
                    f"{host} learned {block}", 30)
        table = speaker_table(lab)
        for block in blocks:
            assert block.split("/")[0] in table, table
        w1, w2 = lab.state.workloads["h1-w1"], lab.state.workloads["h2-w1"]
        for index in (0, 1):  # each family
            assert lab.ping(w1.netns, w2.ips[index], count=2)
            assert lab.ping(w2.netns, w1.ips[index], count=2)
        if tor and kind == "frr":
            # FRR sends our own block back to us (AS path 65100 65001): loop, rejected.
            own = next(c for c, o in blocks.items() if o == "h1")
            wait_until(lambda: any(r["prefix"] == own and r["reason"] == "as-path-loop"
                                   for r in agent(lab, "h1", "bgp_routes", which="rejected")),
                       "h1 rejected its own block echoed by FRR", 10)


ROGUE_STATIC = """
protocol static rogue_routes {{
  ipv4;
  route 0.0.0.0/0 via {gw};
  route 172.16.0.0/24 via {gw};
  route {victim} via {gw};
{extra}}}
"""


def test_a_rogue_peer_reaches_no_kernel():
    with running_lab(pool="10.244.0.0/16") as lab:
        for host in ("h1", "h2"):
            lab.add_host(host)
        for host in ("h1", "h2"):
            lab.wait_agent(host)
            lab.add_workload(host)
        victim = next(c for c, o in blocks_of(lab).items() if o == "h2")
        h2_address = lab.state.hosts["h2"].address
        wait_until(lambda: kernel_routes(lab.state.hosts["h1"].netns).get(victim) ==
                   f"via {h2_address}", "h1 learned h2's block from h2", 15)
        from pathlib import Path

        from fabric.kernel import netns as ns_tools

        rogue_ns = f"{lab.name}-rogue"
        ns_tools.create(rogue_ns)
        lab.plug(rogue_ns, "p-rogue", "10.99.0.250")
        store = lab.store()
        try:
            spec = PeerSpec("rogue", "10.99.0.250", 64512, node="h1", max_prefixes=20)
            store.put(keys.bgp_peer(spec.name), spec.to_record())
        finally:
            store.close()
        bird = Bird(rogue_ns, Path(lab.dir) / "rogue")
        neighbors = [Neighbor("h1", lab.state.hosts["h1"].address, 64512)]

        def config(extra: str = "") -> str:
            # iBGP with next hop self: h2's block arrives with the rogue as next hop.
            return bird_config("10.99.0.250", 64512, neighbors, "tor") + ROGUE_STATIC.format(
                gw=lab.router, victim=victim, extra=extra)

        bird.start(config())
        wait_until(lambda: next((p for p in status(lab, "h1")["peers"]
                                 if p["address"] == "10.99.0.250"), {}).get("received") == 3,
                   "h1 received the rogue's three routes", 30)
        rejected = {r["prefix"]: r["reason"] for r in
                    agent(lab, "h1", "bgp_routes", peer="10.99.0.250", which="rejected")}
        assert rejected == {"0.0.0.0/0": "default-route", "172.16.0.0/24": "outside-pools",
                            victim: "next-hop-mismatch"}
        table = kernel_routes(lab.state.hosts["h1"].netns)
        assert "0.0.0.0/0" not in table and "172.16.0.0/24" not in table
        assert table[victim] == f"via {lab.state.hosts['h2'].address}"

        # Now more prefixes than its max-prefixes (20): the session goes, nothing stays.
        many = "".join(f"  route 10.244.{200 + i // 64}.{(i % 64) * 4}/30 via {lab.router};\n"
                       for i in range(40))
        bird.reconfigure(config(many))
        wait_until(lambda: "max-prefix" in next(p for p in status(lab, "h1")["peers"]
                                                if p["address"] == "10.99.0.250")["last_error"],
                   "the max-prefix limit closed the session", 30)
        peer = next(p for p in status(lab, "h1")["peers"] if p["address"] == "10.99.0.250")
        assert peer["state"] != "Established" and peer["received"] == 0
        assert peer["rejected_by_reason"]["max-prefix"] >= 21
        assert peer["rejected_by_reason"]["default-route"] >= 1
        table = kernel_routes(lab.state.hosts["h1"].netns)
        assert not [p for p in table if p.startswith("10.244.2")], table
        metrics = agent(lab, "h1", "status")["peers"]
        assert metrics  # the other session is unaffected:
        assert next(p for p in metrics if p["address"] == lab.state.hosts["h2"].address
                    )["state"] == "Established"


ROGUE6_STATIC = """
protocol static rogue6 {{
  ipv6;
  route ::/0 via {gw};
  route fd77::/64 via {gw};
  route {victim} via {gw};
  route {own} via {gw};
}}
"""


def test_a_rogue_ipv6_peer_reaches_no_kernel():
    """The same protections per family: a default route, a prefix outside every pool,
    another node's block with the wrong next hop, and a prefix over our own block."""
    with running_lab(pool=None, families=(6,), pool6="fd00:244::/64") as lab:
        for host in ("h1", "h2"):
            lab.add_host(host)
        for host in ("h1", "h2"):
            lab.wait_agent(host)
            lab.add_workload(host)
        owners = blocks_of(lab)
        victim = next(c for c, o in owners.items() if o == "h2")
        own = next(c for c, o in owners.items() if o == "h1")
        h1, h2 = lab.state.hosts["h1"], lab.state.hosts["h2"]
        wait_until(lambda: kernel_routes(h1.netns, family=6).get(victim) == f"via {h2.ipv6}",
                   "h1 learned h2's block from h2", 15)
        from pathlib import Path

        from fabric.kernel import netns as ns_tools

        rogue_ns = f"{lab.name}-rogue"
        ns_tools.create(rogue_ns)
        rogue = "fd99::fa"
        lab.plug(rogue_ns, "p-rogue", rogue)
        store = lab.store()
        try:
            spec = PeerSpec("rogue6", rogue, 64512, node="h1")
            store.put(keys.bgp_peer(spec.name), spec.to_record())
        finally:
            store.close()
        bird = Bird(rogue_ns, Path(lab.dir) / "rogue")
        # iBGP with next hop self: every route arrives with the rogue as next hop.
        bird.start(bird_config("0.0.0.250", 64512, [Neighbor("h1", h1.ipv6, 64512)], "tor",
                               local6=rogue)
                   + ROGUE6_STATIC.format(gw=lab.router6, victim=victim, own=own))
        wait_until(lambda: next((p for p in status(lab, "h1")["peers"]
                                 if p["address"] == rogue), {}).get("received") == 4,
                   "h1 received the rogue's four routes", 30)
        rejected = {r["prefix"]: r["reason"] for r in
                    agent(lab, "h1", "bgp_routes", peer=rogue, which="rejected")}
        assert rejected == {"::/0": "default-route", "fd77::/64": "outside-pools",
                            victim: "next-hop-mismatch", own: "own-block"}
        table = kernel_routes(h1.netns, family=6)
        assert "::/0" not in table and "fd77::/64" not in table
        assert table[victim] == f"via {h2.ipv6}" and table[own] == "blackhole"


def test_md5_passwords():
    with running_lab(pool="10.244.0.0/16") as lab:
        lab.add_host("h1")
        lab.wait_agent("h1")
        from pathlib import Path

        from fabric.kernel import netns as ns_tools

        store = lab.store()
        try:
            for name, address, password in (("good", "10.99.0.250", "s3cret"),
                                            ("bad", "10.99.0.251", "s3cret")):
                ns = f"{lab.name}-{name}"
                ns_tools.create(ns)
                lab.plug(ns, f"p-{name}", address)
                neighbors = [Neighbor("h1", lab.state.hosts["h1"].address, 64512)]
                # The "bad" speaker has another password than the one we configure.
                theirs = password if name == "good" else "wrong"
                Bird(ns, Path(lab.dir) / name).start(
                    bird_config(address, 64512, neighbors, "tor", password=theirs))
                spec = PeerSpec(name, address, 64512, node="h1", password=password)
                store.put(keys.bgp_peer(spec.name), spec.to_record())
        finally:
            store.close()
        wait_until(lambda: next((p for p in status(lab, "h1")["peers"]
                                 if p["address"] == "10.99.0.250"), {}).get("state")
                   == "Established", "the session with the right password is up", 30)
        bad = next(p for p in status(lab, "h1")["peers"] if p["address"] == "10.99.0.251")
        assert bad["state"] != "Established"


def test_agents_as_route_reflectors():
    """Dual stack: the reflector passes each family over the clients' sessions of it."""
    with running_lab(pool="10.244.0.0/16", families=(4, 6), pool6="fd00:244::/64") as lab:
        lab.add_host("h1", rr_cluster_id="10.255.0.1")
        for host in ("h2", "h3"):
            lab.add_host(host)
        for host in ("h1", "h2", "h3"):
            lab.wait_agent(host)
        for host in ("h2", "h3"):
            lab.add_workload(host)
        assert [p["kind"] for p in status(lab, "h2")["peers"]] == ["reflector"] * 2
        assert sorted(p["kind"] for p in status(lab, "h1")["peers"]) == ["rr-client"] * 4
        blocks = blocks_of(lab)
        for host, other in (("h2", "h3"), ("h3", "h2")):
            owner = lab.state.hosts[other]
            for family in (4, 6):
                block = next(c for c, o in blocks.items()
                             if o == other and (":" in c) == (family == 6))
                via = f"via {owner.ipv6 if family == 6 else owner.ipv4}"
                wait_until(lambda h=host, b=block, v=via, f=family: kernel_routes(
                    lab.state.hosts[h].netns, family=f).get(b) == v,
                    f"{host} learned {other}'s block {block} through the reflector", 20)
        w2, w3 = lab.state.workloads["h2-w1"], lab.state.workloads["h3-w1"]
        for index in (0, 1):
            assert lab.ping(w2.netns, w3.ips[index], count=2)


def test_equal_paths_from_two_peers_become_an_ecmp_route():
    from pathlib import Path

    from fabric.kernel import netns as ns_tools

    with running_lab(pool="10.244.0.0/16") as lab:
        lab.add_host("h1", agent_args=["--ecmp", "true"])
        lab.wait_agent("h1")
        store = lab.store()
        try:
            for index, asn in ((1, 65100), (2, 65200)):
                address = f"10.99.0.{249 + index}"
                ns = f"{lab.name}-spk{index}"
                ns_tools.create(ns)
                lab.plug(ns, f"p-spk{index}", address)
                neighbors = [Neighbor("h1", lab.state.hosts["h1"].address, 64512)]
                Bird(ns, Path(lab.dir) / f"spk{index}").start(
                    bird_config(address, asn, neighbors, "tor") +
                    "protocol static ecmp_routes { ipv4; route 10.244.50.0/26 via "
                    f"{lab.router}; }}\n")
                spec = PeerSpec(f"spk{index}", address, asn)
                store.put(keys.bgp_peer(spec.name), spec.to_record())
        finally:
            store.close()
        wait_until(lambda: kernel_routes(lab.state.hosts["h1"].netns).get("10.244.50.0/26")
                   == "via 10.99.0.250 10.99.0.251", "an ECMP route over both peers", 30)
