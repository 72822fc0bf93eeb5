"""ExaBGP configuration rendering."""

from __future__ import annotations

import pytest

from bgp import api
from bgp.config import SpeakerSettings, environment, render
from bgp.peers import Peer
from fabric.model.peers import PeerError, PeerSpec, check_password

SETTINGS = SpeakerSettings("192.0.2.1", 64512, 9, 120, ["/venv/bin/python", "-m", "bgp.relay",
                                                         "@sock"])
PEERS = {"192.0.2.2": Peer("192.0.2.2", 64512, "mesh", "b"),
         "192.0.2.254": Peer("192.0.2.254", 65101, "global", "tor", password="s3cret")}


def block(text: str, address: str) -> str:
    start = text.index(f"neighbor {address} {{")
    return text[start:text.index("\n}\n", start)]


def test_every_neighbor_carries_our_routes_as_statics():
    text = render(SETTINGS, PEERS, ["10.244.0.64/26", "10.244.0.0/26"])
    assert "run /venv/bin/python -m bgp.relay @sock;" in text
    for address in PEERS:
        section = block(text, address)
        assert "route 10.244.0.0/26 next-hop self;" in section
        assert section.index("10.244.0.0/26") < section.index("10.244.0.64/26")
        assert "hold-time 9;" in section and "graceful-restart 120;" in section
        assert "local-address 192.0.2.1;" in section
    assert 'md5-password "s3cret";' in block(text, "192.0.2.254")
    assert "md5-password" not in block(text, "192.0.2.2")
    assert "peer-as 65101;" in block(text, "192.0.2.254")


def test_rendering_is_deterministic_and_graceful_restart_optional():
    one = render(SETTINGS, PEERS, ["10.244.0.0/26"])
    assert one == render(SETTINGS, dict(reversed(PEERS.items())), ["10.244.0.0/26"])
    no_gr = SpeakerSettings("192.0.2.1", 64512, 9, 0, ["x"])
    assert "graceful-restart" not in render(no_gr, PEERS, [])


def test_reflected_routes_keep_next_hop_and_carry_rr_attributes():
    route = api.Reflected("10.244.1.0/26", "192.0.2.3", (65001,), "192.0.2.3", ("1.1.1.1",))
    assert api.announce_reflected("192.0.2.2", [route]) == [
        "neighbor 192.0.2.2 announce attributes next-hop 192.0.2.3 as-path [ 65001 ] "
        "originator-id 192.0.2.3 cluster-list [ 1.1.1.1 ] nlri 10.244.1.0/26"]
    assert "10.244.1.0/26" not in render(SETTINGS, PEERS, [])  # API only, never the file


def test_reflected_routes_with_the_same_attributes_go_in_one_command_per_batch():
    def route(prefix: str, next_hop: str) -> api.Reflected:
        return api.Reflected(prefix, next_hop, (), next_hop, ("1.1.1.1",))
    routes = [route(f"10.{i // 256}.{i % 256}.0/24", "192.0.2.3") for i in range(1500)]
    routes.append(route("10.99.0.0/26", "192.0.2.4"))
    lines = api.announce_reflected("192.0.2.2", routes)
    assert len(lines) == 3  # 1,500 in two batches, and the other next hop's one
    assert sum(len(line.split(" nlri ")[1].split()) for line in lines) == 1501
    assert lines[-1].endswith("next-hop 192.0.2.4 originator-id 192.0.2.4 "
                              "cluster-list [ 1.1.1.1 ] nlri 10.99.0.0/26")
    assert api.announce_reflected("192.0.2.2", []) == []


def test_our_routes_go_through_the_api_in_batches():
    prefixes = [f"10.{i // 256}.{i % 256}.0/24" for i in range(2500)]
    lines = api.announce_self(prefixes)
    assert len(lines) == 3 and lines[0].startswith("announce attributes next-hop self nlri ")
    assert sum(len(line.split(" nlri ")[1].split()) for line in lines) == 2500
    # One family a line (ExaBGP acts on one family of a mixed line).
    assert api.withdraw(["fd00:244::40/122", "10.0.0.0/24", "fd00:244::/122"]) == [
        "withdraw attributes next-hop self nlri 10.0.0.0/24",
        "withdraw attributes next-hop self nlri fd00:244::/122 fd00:244::40/122"]
    assert api.announce_self(["fd00:244::/122", "10.0.0.0/24"]) == [
        "announce attributes next-hop self nlri 10.0.0.0/24",
        "announce attributes next-hop self nlri fd00:244::/122"]
    assert api.withdraw(["10.0.0.0/24"], "192.0.2.2") == [
        "neighbor 192.0.2.2 withdraw attributes next-hop self nlri 10.0.0.0/24"]


def test_passwords_exabgp_cannot_carry_are_refused():
    assert check_password("s3cret-!#") == "s3cret-!#"
    # a newline would end the line in ExaBGP's file; the others end the string or block
    for password in ('a"b', "a b", "s3cret\n", "a;b", "{", "", "x" * 81, 7):
        with pytest.raises(PeerError, match="password"):
            check_password(password)
    record = PeerSpec("x", "192.0.2.9", 1, password="ok").to_record()
    with pytest.raises(PeerError, match="password"):  # a record written by hand, too
        PeerSpec.from_record(record | {"password": "two words"})
    bad = {"192.0.2.9": Peer("192.0.2.9", 1, "global", "x", password="a;b")}
    with pytest.raises(ValueError, match="password"):
        render(SETTINGS, bad, [])


def test_environment_keeps_exabgp_tied_to_the_agent():
    env = environment("192.0.2.1")
    assert env["exabgp.api.terminate"] == "true" and env["exabgp.api.respawn"] == "false"
    assert env["exabgp.tcp.bind"] == "192.0.2.1" and env["exabgp.api.cli"] == "false"
    assert env["exabgp.daemon.pid"] == ""  # a stale pid file once blocked the restart


def test_a_peer_name_with_a_quote_cannot_break_the_file():
    peers = {"192.0.2.9": Peer("192.0.2.9", 65100, "global", 'ev"il;}')}
    text = render(SETTINGS, peers, [])
    assert 'description "global ev_il__";' in text
