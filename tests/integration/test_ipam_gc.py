"""IPAM garbage collection against a real etcd: grace period, live namespaces,
registered workloads and departed nodes."""

from __future__ import annotations

from fabric.model.nodes import Node, Workload
from fabric.model.pools import parse_pool
from fabric.store.registry import Registry
from ipam.allocator import Ipam
from ipam.gc import LeakTracker, collect


def test_gc_frees_a_leak_only_after_grace_and_never_a_live_one(store):
    ipam, registry = Ipam(store), Registry(store)
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    store.put("/l3fabric/v1/nodes/node-a", Node("node-a", "192.0.2.1", 64512).to_record())
    live = ipam.allocate("live.eth0", "node-a", attrs={"netns": "/run/netns/live"})
    registry.register_workload(Workload("live.eth0", "node-a", "live", "eth0",
                                        "/run/netns/live", live.addresses()))
    ipam.allocate("leak.eth0", "node-a", attrs={"netns": "/run/netns/gone"})
    ipam.allocate("busy.eth0", "node-a", attrs={"netns": "/run/netns/still-there"})
    tracker = LeakTracker(grace=600)
    exists = {"/run/netns/still-there"}.__contains__

    first = collect(ipam, "node-a", tracker, now=1000.0, netns_exists=exists)
    assert first.released == [] and first.pending == 2  # seen, but not yet for long enough
    later = collect(ipam, "node-a", tracker, now=1000.0 + 601, netns_exists=exists)
    assert later.released == ["leak.eth0"]
    assert later.kept_netns_alive == ["busy.eth0"]
    assert ipam.release("leak.eth0") == []  # already gone
    assert store.get("/l3fabric/v1/ipam/handles/live.eth0") is not None
    assert store.get("/l3fabric/v1/ipam/handles/busy.eth0") is not None


def test_gc_gives_back_empty_blocks_of_departed_nodes(store):
    ipam = Ipam(store)
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    store.put("/l3fabric/v1/nodes/node-a", Node("node-a", "192.0.2.1", 64512).to_record())
    ipam.allocate("x.eth0", "node-gone")
    ipam.release("x.eth0")
    assert [b.cidr for b in ipam.blocks_of("node-gone")] == ["10.244.0.0/26"]
    result = collect(ipam, "node-a", LeakTracker(grace=0), now=0.0)
    assert result.blocks_freed == ["10.244.0.0/26"]
    assert ipam.blocks() == []
