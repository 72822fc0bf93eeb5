"""Small pure pieces: DNS answers, metrics text, NAT rules."""

from __future__ import annotations

import socket
import struct

from fabric.agent.dns import answer, parse_query
from fabric.agent.metrics import Family, Sample, render
from fabric.kernel.nat import CHAIN, rules

NAMES = {"web-1": ["10.244.0.5", "fd00::5"], "db": ["10.244.0.9"]}


def query(name: str, qtype: int = 1, ident: int = 7) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + \
        struct.pack("!HH", qtype, 1)


def decode(reply: bytes) -> tuple[int, list[str]]:
    _, flags, _, ancount, _, _ = struct.unpack_from("!HHHHHH", reply)
    assert parse_query(query("x")) is not None
    offset = 12
    while reply[offset]:
        offset += reply[offset] + 1
    offset += 5
    addresses = []
    for _ in range(ancount):
        _, qtype, _, _, length = struct.unpack_from("!HHHIH", reply, offset)
        offset += 12
        family = socket.AF_INET6 if qtype == 28 else socket.AF_INET
        addresses.append(socket.inet_ntop(family, reply[offset:offset + length]))
        offset += length
    return flags & 0xF, addresses


def test_dns_answers_a_and_aaaa_for_registered_names():
    lookup = lambda name: NAMES.get(name, [])  # noqa: E731
    assert decode(answer(query("web-1.fabric.internal"), "fabric.internal", lookup)) == \
        (0, ["10.244.0.5"])
    assert decode(answer(query("WEB-1.Fabric.Internal", 28), "fabric.internal", lookup)) == \
        (0, ["fd00::5"])
    assert decode(answer(query("nobody.fabric.internal"), "fabric.internal", lookup)) == (3, [])
    assert decode(answer(query("example.com"), "fabric.internal", lookup)) == (5, [])
    reply = answer(b"\x00\x07garbage", "fabric.internal", lookup)
    assert reply is not None and struct.unpack_from("!H", reply, 2)[0] & 0xF == 1


def test_metrics_text_format():
    text = render([Family("bgp_sessions", "gauge", "sessions",
                          (Sample("bgp_sessions", 2, {"state": "Established"}),))])
    assert "# TYPE l3fabric_bgp_sessions gauge" in text
    assert 'l3fabric_bgp_sessions{state="Established"} 2' in text


def test_nat_rules_skip_traffic_between_pools():
    doc = rules(["10.244.0.0/16"], ["10.244.0.0/16", "10.96.0.0/16"])
    assert f"-A {CHAIN} -s 10.244.0.0/16 -d 10.96.0.0/16 -j RETURN" in doc
    assert doc.index("RETURN") < doc.index("MASQUERADE")
    assert "MASQUERADE" not in rules([], ["10.244.0.0/16"])
