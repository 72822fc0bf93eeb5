"""Records as another writer (or a hand with etcdctl) may leave them: each refused with
a ValueError naming the field, never an exception the agent's loop does not expect."""

from __future__ import annotations

import json

import pytest

from fabric.model.blocks import Block
from fabric.model.handles import Allocation, Handle
from fabric.model.nodes import Node, Workload
from fabric.model.peers import PeerSpec
from fabric.model.pools import Pool, parse_pool
from fabric.store.datastore import decode
from fabric.store.errors import CorruptValue

NODE = Node("h1", "10.99.0.11", 64512).to_record()
WORKLOAD = Workload("h", "h1", "c", "eth0", "/run/netns/x", ("10.1.0.1",)).to_record()
POOL = parse_pool("p", "10.1.0.0/16", 26).to_record()
HANDLE = Handle("c.eth0", "h1", (Allocation("10.1.0.5", "10.1.0.0/26", "p"),),
                {"container_id": "c"}).to_record()


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


@pytest.mark.parametrize("cls", [Node, Workload, Pool, Block, Handle, Allocation, PeerSpec])
@pytest.mark.parametrize("value", [["a"], "text", 5, None, True])
def test_a_record_that_is_not_a_json_object_is_refused_by_name(cls, value):
    """Once an AttributeError (`list.get`) that the readers did not expect."""
    with pytest.raises(ValueError, match="not a JSON object"):
        cls.from_record(value)


@pytest.mark.parametrize("change, field", [
    ({"handle": None}, "handle"), ({"node": ["h1"]}, "node"),
    ({"allocations": {"a": 1}}, "allocations"), ({"attrs": ["x"]}, "attrs"),
    ({"allocations": ["10.1.0.5"]}, "allocation"),
    ({"allocations": [{"address": "garbage", "block": "10.1.0.0/26", "pool": "p"}]},
     "address"),
    ({"allocations": [{"address": "10.1.0.5", "block": "10.1.0.1/26", "pool": "p"}]},
     "block"),
    ({"allocations": [{"address": "10.9.0.5", "block": "10.1.0.0/26", "pool": "p"}]},
     "not in its block"),
    ({"allocations": [{"address": "10.1.0.5", "block": "10.1.0.0/26", "pool": None}]},
     "pool"),
    ({"allocations": [{"address": "10.1.0.5", "block": "10.1.0.0/26", "pool": "p",
                       "borrowed": "false"}]}, "borrowed"),
])
def test_bad_handle_records_name_the_field(change, field):
    """A handle's addresses are computed with (a release finds the address's offset in
    its block): a garbled one is refused when read, not where it is used."""
    with pytest.raises(ValueError, match=field):
        Handle.from_record(HANDLE | change)


@pytest.mark.parametrize("change, field", [
    ({"name": 5.5}, "name"), ({"cidr": None}, "cidr"), ({"disabled": "false"}, "disabled"),
    ({"nat_outgoing": 1}, "nat_outgoing"), ({"strict_affinity": "yes"}, "strict_affinity"),
])
def test_bad_pool_records_name_the_field(change, field):
    """`disabled: "false"` read as true once: a pool switched off by a typo."""
    with pytest.raises(ValueError, match=field):
        Pool.from_record(POOL | change)


def test_good_handle_and_pool_records_still_read():
    assert Handle.from_record(HANDLE).addresses() == ("10.1.0.5",)
    assert Handle.from_record(HANDLE | {"attrs": None}).attrs == {}
    assert Pool.from_record(POOL | {"disabled": None}).disabled is False
    assert Pool.from_record(POOL | {"disabled": True}).disabled is True
