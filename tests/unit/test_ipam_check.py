from fabric.model.blocks import Block
from fabric.model.handles import Allocation, Handle
from fabric.model.pools import parse_pool
from ipam.check import IpOwner, Snapshot, check, usage
from ipam.gc import LeakTracker

POOL = parse_pool("p", "10.0.0.0/24", 26)
BLOCK = "10.0.0.0/26"


def handle(name, *addresses, node="n1"):
    return Handle(name, node, tuple(Allocation(a, BLOCK, "p") for a in addresses))


def snapshot(handles, ips, workloads, nodes=("n1",), blocks=None):
    """`workloads`: (node, handle) pairs registered without addresses, or a dict of
    (node, handle) -> the addresses the registration lists."""
    blocks = blocks or [Block(BLOCK, "p", "n1")]
    registered = workloads if isinstance(workloads, dict) else dict.fromkeys(workloads, ())
    return Snapshot([POOL], list(blocks), ips, {h.handle: h for h in handles},
                    registered, set(nodes))


def test_clean_state_has_no_findings():
    snap = snapshot([handle("a", "10.0.0.1")], [IpOwner("10.0.0.1", BLOCK, "a", "n1")],
                    [("n1", "a")])
    report = check(snap)
    assert report.ok
    assert report.counts["addresses_used"] == 1
    assert report.counts["addresses_free_in_blocks"] == 63


def test_each_kind_is_found():
    snap = snapshot(
        [handle("leaky", "10.0.0.1"), handle("dangles", "10.0.0.2"),
         handle("dup1", "10.0.0.3"), handle("dup2", "10.0.0.3")],
        [IpOwner("10.0.0.1", BLOCK, "leaky", "n1"), IpOwner("10.0.0.3", BLOCK, "dup1", "n1"),
         IpOwner("10.0.0.9", BLOCK, "ghost", "n1")],
        [("n1", "dangles"), ("n1", "dup1"), ("n1", "dup2")],
        nodes=(), blocks=[Block(BLOCK, "p", "n1")])
    report = check(snap)
    assert [f.subject for f in report.of("leak")] == ["leaky"]
    assert [f.subject for f in report.of("dangling")] == ["dangles"]
    assert {f.subject for f in report.of("duplicate")} == {"10.0.0.3"}
    assert [f.subject for f in report.of("orphan-ip")] == ["10.0.0.9"]
    assert [f.subject for f in report.of("orphan-block")] == [BLOCK]
    assert not report.ok


def test_workload_addresses_are_compared_with_what_ipam_holds():
    snap = snapshot(
        [handle("ok", "10.0.0.1"), handle("freed", "10.0.0.2"), handle("thief", "10.0.0.3")],
        [IpOwner("10.0.0.1", BLOCK, "ok", "n1"), IpOwner("10.0.0.3", BLOCK, "thief", "n1")],
        {("n1", "ok"): ("10.0.0.1",), ("n1", "freed"): ("10.0.0.2",),
         ("n1", "victim"): ("10.0.0.3",), ("n1", "thief"): ("10.0.0.3",)})
    report = check(snap)
    unreserved, = report.of("workload-unreserved")
    assert (unreserved.subject, unreserved.node, unreserved.addresses) == (
        "freed", "n1", ("10.0.0.2",))
    assert "no handle holds" in unreserved.detail
    conflict, = report.of("workload-conflict")
    assert (conflict.subject, conflict.addresses) == ("victim", ("10.0.0.3",))
    assert "handle thief holds" in conflict.detail
    assert report.counts["workload-unreserved"] == 1 and report.counts["workload-conflict"] == 1
    assert not report.ok
    assert report.to_dict()["findings"]  # what --json prints


def test_orphan_ip_used_by_its_workload_says_it_is_kept():
    snap = snapshot([], [IpOwner("10.0.0.1", BLOCK, "lost", "n1")],
                    {("n1", "lost"): ("10.0.0.1",)})
    orphan, = check(snap).of("orphan-ip")
    assert "release --leaked keeps it" in orphan.detail


def test_usage_per_pool_and_host():
    snap = snapshot([], [IpOwner("10.0.0.1", BLOCK, "a", "n1")], [],
                    blocks=[Block(BLOCK, "p", "n1"), Block("10.0.0.64/26", "p", "n2")])
    rows = usage(snap)
    assert (rows[0].node, rows[0].blocks, rows[0].used, rows[0].free) == (None, 2, 1, 255)
    assert [(r.node, r.used, r.free) for r in rows[1:]] == [("n1", 1, 63), ("n2", 0, 64)]


def test_leak_tracker_needs_continuous_sighting():
    tracker = LeakTracker(grace=600)
    assert tracker.observe(["a", "b"], now=0) == []
    assert tracker.observe(["a", "b"], now=599) == []
    assert tracker.observe(["a"], now=600) == ["a"]  # b recovered: forgotten
    assert tracker.observe(["a", "b"], now=700) == ["a"]
    assert tracker.observe(["a", "b"], now=1300) == ["a", "b"]


def test_addresses_in_a_block_with_no_record_are_found():
    snap = snapshot([handle("a", "10.0.0.1")], [IpOwner("10.0.0.1", BLOCK, "a", "n1")],
                    [("n1", "a")], blocks=[Block("10.0.0.64/26", "p", "n2")], nodes=("n1", "n2"))
    [finding] = check(snap).of("blockless")
    assert (finding.subject, finding.node, finding.addresses) == (BLOCK, "n1", ("10.0.0.1",))


def test_a_pool_over_a_nodes_underlay_is_found():
    """Written before the node registered (or by hand): the node's agent refuses the
    blocks there, so `ipam check` names the pool and what it covers."""
    from fabric.model.nodes import Node
    snap = snapshot([], [], [])
    snap.node_records = [Node("n1", "10.0.0.200", 64512, networks=("10.0.0.192/26",))]
    [found] = check(snap).of("underlay")
    assert found.subject == "p"
    assert "node n1's underlay network 10.0.0.192/26" in found.detail
    assert "node n1 (10.0.0.200)" in found.detail
    snap.node_records = [Node("n1", "192.0.2.1", 64512, networks=("192.0.2.0/24",))]
    assert check(snap).ok
