"""IP pools and BGP peers never swallow the underlay, against a real etcd.

A pool that contains a node's or a peer's address makes a host blackhole the block
around it; a configured peer at a node's address replaces the working mesh session
with one that never comes up. Both are refused, and the refusal is part of the
compare-and-swap that writes: a node registering (or a peer or pool appearing)
between the check and the write is caught by the compares, shown here by a
datastore that writes exactly then.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from fabric.cli.bgp import add_peer
from fabric.model.nodes import Node
from fabric.model.peers import PeerError, PeerSpec, parse_peer
from fabric.model.pools import PoolError, parse_pool
from fabric.store import keys
from fabric.store.datastore import Datastore, Listing
from ipam.allocator import Ipam

FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]


class WritesAfterListing(Datastore):
    """A real etcd client that, the first time `prefix` is listed, writes `record` at
    `key` right after the listing: the moment a concurrent writer could slip in."""

    prefix = ""
    key = ""
    record: dict[str, Any] = {}
    fired = False

    def list(self, prefix: str, keys_only: bool = False) -> Listing:
        listing = super().list(prefix, keys_only)
        if prefix == self.prefix and not self.fired:
            self.fired = True
            self.put(self.key, self.record)
        return listing


@pytest.fixture
def racing(etcd_settings, store):
    made: list[Datastore] = []

    def make(prefix: str, key: str, record: dict[str, Any]) -> WritesAfterListing:
        racer = WritesAfterListing.connect(etcd_settings)
        assert isinstance(racer, WritesAfterListing)
        racer.prefix, racer.key, racer.record = prefix, key, record
        made.append(racer)
        return racer

    yield make
    for racer in made:
        racer.close()


@pytest.fixture
def ctl(etcd_server, store):
    def run(*argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*FABRICCTL, "--etcd-endpoints", etcd_server.endpoint, *argv],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expect, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result
    return run


def register(store: Datastore, name: str, address: str) -> None:
    store.put(keys.node(name), Node(name, address, 64512).to_record())


def test_pool_containing_a_node_address_is_refused(ctl, store):
    register(store, "h1", "10.99.0.11")
    err = ctl("ipam", "pool", "add", "underlay", "10.99.0.0/24", expect=2).stderr
    assert "node h1 (10.99.0.11)" in err
    assert Ipam(store).pools() == []
    ctl("ipam", "pool", "add", "default", "10.244.0.0/16")


def test_pool_containing_a_peer_address_is_refused(ctl, store):
    ctl("bgp", "peer", "add", "tor1", "10.98.0.254", "--as", "65000")
    err = ctl("ipam", "pool", "add", "wide", "10.98.0.0/16", expect=2).stderr
    assert "BGP peer tor1 (10.98.0.254)" in err
    assert Ipam(store).pools() == []


def test_pool_add_sees_a_node_that_registers_meanwhile(store, racing):
    racer = racing(keys.NODES, keys.node("late"), Node("late", "10.99.0.12", 64512).to_record())
    with pytest.raises(PoolError, match=r"node late \(10.99.0.12\)"):
        Ipam(racer).add_pool(parse_pool("underlay", "10.99.0.0/24"))
    assert racer.fired and Ipam(store).pools() == []


def test_pool_add_sees_a_peer_added_meanwhile(store, racing):
    spec = PeerSpec("tor9", "10.97.0.9", 65000)
    racer = racing(keys.BGP_PEERS, keys.bgp_peer("tor9"), spec.to_record())
    with pytest.raises(PoolError, match=r"BGP peer tor9 \(10.97.0.9\)"):
        Ipam(racer).add_pool(parse_pool("p", "10.97.0.0/24"))
    assert racer.fired and Ipam(store).pools() == []


def test_peer_at_a_node_address_is_refused(ctl, store):
    register(store, "h1", "10.99.0.11")
    err = ctl("bgp", "peer", "add", "x", "10.99.0.11", "--as", "65000", expect=2).stderr
    assert "node h1" in err and "10.99.0.11" in err
    assert store.keys(keys.BGP_PEERS) == []
    ctl("bgp", "peer", "add", "tor1", "10.99.0.254", "--as", "65000")


def test_peer_inside_a_pool_is_refused(ctl, store):
    ctl("ipam", "pool", "add", "default", "10.244.0.0/16")
    err = ctl("bgp", "peer", "add", "x", "10.244.3.1", "--as", "65000", expect=2).stderr
    assert "inside IP pool default (10.244.0.0/16)" in err
    assert store.keys(keys.BGP_PEERS) == []


def test_peer_add_sees_a_node_that_registers_meanwhile(store, racing):
    racer = racing(keys.NODES, keys.node("late"), Node("late", "10.99.0.12", 64512).to_record())
    with pytest.raises(PeerError, match="address of node late"):
        add_peer(racer, parse_peer("x", "10.99.0.12", 65000))
    assert racer.fired and store.keys(keys.BGP_PEERS) == []


def test_peer_add_sees_a_pool_added_meanwhile(store, racing):
    pool = parse_pool("late", "10.96.0.0/24")
    racer = racing(keys.POOLS, keys.pool("late"), pool.to_record())
    with pytest.raises(PeerError, match="inside IP pool late"):
        add_peer(racer, parse_peer("x", "10.96.0.1", 65000))
    assert racer.fired and store.keys(keys.BGP_PEERS) == []


def test_peer_name_taken_is_still_reported(store):
    add_peer(store, parse_peer("tor1", "10.99.0.254", 65000))
    with pytest.raises(PeerError, match="a peer named tor1 exists"):
        add_peer(store, parse_peer("tor1", "10.99.0.253", 65000))
