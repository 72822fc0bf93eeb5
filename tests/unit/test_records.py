"""Records as another writer (or a hand with etcdctl) may leave them: each refused with
a ValueError naming the field, never an exception the agent's loop does not expect."""

from __future__ import annotations

import json

import pytest

from fabric.model.nodes import Node, Workload
from fabric.model.pools import Pool, parse_pool
from fabric.store.datastore import decode
from fabric.store.errors import CorruptValue

NODE = Node("h1", "10.99.0.11", 64512).to_record()
WORKLOAD = Workload("h", "h1", "c", "eth0", "/run/netns/x", ("10.1.0.1",)).to_record()
POOL = parse_pool("p", "10.1.0.0/16", 26).to_record()


@pytest.mark.parametrize("change, field", [
    ({"asn": 1e999}, "AS"), ({"asn": 2.5}, "AS"), ({"asn": True}, "AS"),
    ({"asn": "65000x"}, "AS"), ({"started_at": float("inf")}, "started_at"),
    ({"started_at": "yesterday"}, "started_at"), ({"address": "fe80::1%eth0"}, "address"),
    ({"address6": "fe80::1%eth0"}, "address6"), ({"name": True}, "name"),
    ({"name": ["h1"]}, "name"),
])
def test_bad_node_records_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        Node.from_record(NODE | change)


@pytest.mark.parametrize("change, field", [
    ({"name": ["a", "b"]}, "name"), ({"host_ifname": {"x": 1}}, "host_ifname"),
    ({"created_at": 1e999}, "created_at"), ({"netns": [1]}, "netns"),
    ({"namespace": 5.5}, "namespace"),
])
def test_bad_workload_records_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        Workload.from_record(WORKLOAD | change)


@pytest.mark.parametrize("size", [1e999, 26.5, "x", None, True])
def test_bad_block_sizes_name_the_field(size):
    with pytest.raises(ValueError, match="block_size"):
        Pool.from_record(POOL | {"block_size": size})


def test_good_records_still_read():
    assert Node.from_record(NODE).asn == 64512
    assert Node.from_record(NODE | {"asn": 65000.0}).asn == 65000  # JSON may say 65000.0
    assert Workload.from_record(WORKLOAD).ips == ("10.1.0.1",)
    assert Pool.from_record(POOL).block_size == 26


def test_json_nested_too_deeply_is_a_corrupt_value():
    with pytest.raises(CorruptValue, match="nested too deeply"):
        decode("/k", b"[" * 100_000 + b"]" * 100_000)
    assert decode("/k", json.dumps({"v": 1, "a": 1}).encode()) == {"a": 1}
