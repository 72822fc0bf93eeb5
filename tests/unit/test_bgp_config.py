"""ExaBGP configuration rendering."""

from __future__ import annotations

import pytest

from bgp.config import Reflected, SpeakerSettings, environment, password_ok, render
from bgp.peers import Peer

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
    reflected = {"192.0.2.2": [Reflected("10.244.1.0/26", "192.0.2.3", (), "192.0.2.3",
                                         "1.1.1.1")]}
    section = block(render(SETTINGS, PEERS, [], reflected), "192.0.2.2")
    assert ("route 10.244.1.0/26 next-hop 192.0.2.3 originator-id 192.0.2.3 "
            "cluster-list [ 1.1.1.1 ];") in section


def test_passwords_exabgp_cannot_carry_are_refused():
    assert password_ok("s3cret-!#") and not password_ok('a"b') and not password_ok("a b")
    bad = {"192.0.2.9": Peer("192.0.2.9", 1, "global", "x", password="a;b")}
    with pytest.raises(ValueError, match="password"):
        render(SETTINGS, bad, [])


def test_environment_keeps_exabgp_tied_to_the_agent():
    env = environment("192.0.2.1", "/run/x/exabgp.pid")
    assert env["exabgp.api.terminate"] == "true" and env["exabgp.api.respawn"] == "false"
    assert env["exabgp.tcp.bind"] == "192.0.2.1" and env["exabgp.api.cli"] == "false"
