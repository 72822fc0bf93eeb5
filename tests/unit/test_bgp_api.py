"""Parsing ExaBGP's JSON API lines (recorded from ExaBGP 5.0.15 runs here)."""

from __future__ import annotations

from bgp import api

HEAD = ('{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, '
        '"counter": 1, ')
NEIGHBOR = ('"neighbor": { "address": { "local": "10.77.0.1", "peer": "10.77.0.2" }, '
            '"asn": { "local": 64512, "peer": 64512 }, "router-id": "10.77.0.1" , ')


def parse(text):
    return list(api.parse_line(text))


def test_acks_and_garbage():
    assert parse("done") == [api.Ack(True)]
    assert parse("error\n") == [api.Ack(False)]
    assert parse("") == []
    assert parse("not json") == [api.Unknown("not json")]


def test_state_lines():
    line = HEAD + '"type": "state", ' + NEIGHBOR + \
        '"state": "down", "reason": "notification sent (4,0)" } }'
    assert parse(line) == [api.PeerState("10.77.0.2", "down", "notification sent (4,0)")]


def test_open_with_graceful_restart():
    line = HEAD + '"type": "open", ' + NEIGHBOR + ('"direction": "receive", "open": { '
        '"version": 4, "asn": 64512, "hold_time": 240, "router_id": "10.77.0.2", '
        '"capabilities": { "64": { "name": "graceful restart", "time": 120, '
        '"address-family-flags": { "ipv4/unicast": [ ] }, "restart-flags": [ ] } } } } }')
    assert parse(line) == [api.Open("10.77.0.2", 120, 240, "10.77.0.2")]


def test_notification():
    line = HEAD + '"type": "notification", ' + NEIGHBOR + ('"direction": "receive", '
        '"notification": { "code": 6, "subcode": 2, "data": "0x", "message": "" } } }')
    assert parse(line) == [api.Notification("10.77.0.2", 6, 2, True)]


def test_update_with_nested_as_path_and_withdrawals():
    line = HEAD + '"type": "update", ' + NEIGHBOR + ('"direction": "receive", "message": '
        '{ "update": { "attribute": { "origin": "igp", "as-path": { "0": { "element": '
        '"as-sequence", "value": [ 65001, 64512 ] } }, "local-preference": 100 }, '
        '"announce": { "ipv4 unicast": { "10.77.0.2": [ { "nlri": "10.244.2.0/26" }, '
        '{ "nlri": "10.244.3.0/26" } ] } }, "withdraw": { "ipv4 unicast": [ '
        '{ "nlri": "10.244.9.0/26" } ] } } } } }')
    (update,) = parse(line)
    assert update.peer == "10.77.0.2"
    assert update.announced == {"10.77.0.2": ["10.244.2.0/26", "10.244.3.0/26"]}
    assert update.withdrawn == ["10.244.9.0/26"]
    assert update.attributes.as_path == (65001, 64512)
    assert update.attributes.local_pref == 100


def test_flat_as_path_and_end_of_rib():
    assert api.as_path_of([65001, 65002]) == (65001, 65002)
    line = HEAD + '"type": "update", ' + NEIGHBOR + ('"direction": "receive", "message": '
        '{ "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }')
    assert parse(line) == [api.EndOfRib("10.77.0.2", "ipv4 unicast")]


def test_commands():
    assert api.withdraw(["10.244.0.0/26"]) == [
        "withdraw attributes next-hop self nlri 10.244.0.0/26"]
    assert api.withdraw(["10.244.0.0/26"], "10.77.0.2") == [
        "neighbor 10.77.0.2 withdraw attributes next-hop self nlri 10.244.0.0/26"]
    assert api.withdraw([]) == []
    assert api.teardown("10.77.0.2", 1) == "neighbor 10.77.0.2 teardown 1"


def test_an_ipv6_route_with_a_link_local_next_hop_too_keeps_the_global_one():
    line = ('{"type":"update","neighbor":{"address":{"peer":"fd99::fd"},"message":{"update":'
            '{"attribute":{"as-path":[65100,65002]},"announce":{"ipv6 unicast":{'
            '"fd99::fd":[{"nlri":"fd00:244::40/122"}],'
            '"fe80::78:27ff:fe89:eacc":[{"nlri":"fd00:244::40/122"},{"nlri":"fd00:9::/64"}]}}}}}}')
    [update] = list(api.parse_line(line))
    assert update.announced == {"fd99::fd": ["fd00:244::40/122"],
                                "fe80::78:27ff:fe89:eacc": ["fd00:9::/64"]}


def test_a_reflected_update_carries_its_originator_and_cluster_list():
    line = HEAD + '"type": "update", ' + NEIGHBOR + (
        '"direction": "receive", "message": { "update": { "attribute": { "origin": "igp", '
        '"local-preference": 100, "originator-id": "10.99.0.15", "cluster-list": '
        '[ "10.255.0.2", "10.255.0.1" ] }, "announce": { "ipv4 unicast": { "10.99.0.15": '
        '[ { "nlri": "10.244.0.0/26" } ] } } } } } }')
    [update] = parse(line)
    assert update.attributes.originator_id == "10.99.0.15"
    assert update.attributes.cluster_list == ("10.255.0.2", "10.255.0.1")
    assert update.announced == {"10.99.0.15": ["10.244.0.0/26"]}
