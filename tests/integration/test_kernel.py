"""The kernel writer against a real kernel, in a namespace of its own."""

from __future__ import annotations

import queue
import subprocess
from concurrent.futures import Future

import pytest

from fabric.kernel import netns
from fabric.kernel.netns import entered
from fabric.kernel.routes import Applied, Resynced, Route, RouteEvent, blackhole, remote
from fabric.kernel.writer import KernelWriter
from fabric.model.prefix import Prefix
from tests.conftest import needs_root
from tests.support.fabric import kernel_routes

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture
def ns(netns_factory):
    name = netns_factory("k")
    for command in (["link", "add", "a0", "type", "veth", "peer", "name", "a1"],
                    ["addr", "add", "192.0.2.1/24", "dev", "a0"],
                    ["link", "set", "a0", "up"], ["link", "set", "a1", "up"]):
        subprocess.run(["ip", "-n", name, *command], check=True)
    return name


class Reports:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()

    def __call__(self, report: object) -> None:
        self.queue.put(report)

    def next(self, kind: type, timeout: float = 10.0) -> object:
        """The next report of `kind` (others are skipped)."""
        while True:
            report = self.queue.get(timeout=timeout)
            if isinstance(report, kind):
                return report


def start(ns: str, *routes: str) -> tuple[KernelWriter, Reports, list[Route]]:
    for prefix in routes:  # a previous run's routes
        subprocess.run(["ip", "-n", ns, "route", "add", prefix, "via", "192.0.2.2", "proto",
                        "73"], check=True)
    reports = Reports()
    with entered(netns.path(ns)):
        writer = KernelWriter(73, reports)
        taken = writer.take_over()
        writer.start()  # its threads are created here, so they live in the namespace too
    return writer, reports, taken


@pytest.fixture
def writer(ns):
    made, reports, _ = start(ns)
    yield made, reports
    made.stop()


def p(text: str) -> Prefix:
    return Prefix.parse(text)


def applied(writer: KernelWriter, replace=(), delete=()) -> list:
    reply: Future = Future()
    writer.apply(replace, delete, reply)
    return reply.result(10)


def test_batches_are_applied_in_order_and_other_protocols_left_alone(ns, writer):
    kernel, _ = writer
    subprocess.run(["ip", "-n", ns, "route", "add", "10.9.0.0/24", "via", "192.0.2.254"],
                   check=True)
    one = remote(p("10.1.0.0/26"), ["192.0.2.2"])
    ecmp = remote(p("10.1.0.64/26"), ["192.0.2.3", "192.0.2.2"])
    hole = blackhole(p("10.1.1.0/26"))
    kernel.apply([one, ecmp], [])
    kernel.apply([hole], [])
    kernel.apply([], [one.prefix])  # queued after the install: must win
    kernel.apply([remote(p("10.1.0.0/26"), ["192.0.2.3"])], [])  # and this after it
    assert applied(kernel) == []
    assert kernel_routes(ns) == {"10.1.0.0/26": "via 192.0.2.3",
                                 "10.1.0.64/26": "via 192.0.2.2 192.0.2.3",
                                 "10.1.1.0/26": "blackhole"}
    assert "10.9.0.0/24 via 192.0.2.254" in subprocess.run(
        ["ip", "-n", ns, "route"], capture_output=True, text=True, check=True).stdout


def test_drift_is_what_others_did_never_our_own_queued_writes(ns, writer):
    kernel, reports = writer
    route = remote(p("10.1.0.0/26"), ["192.0.2.2"])
    assert applied(kernel, [route]) == []
    subprocess.run(["ip", "-n", ns, "route", "del", "10.1.0.0/26"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "10.7.0.0/24", "via", "192.0.2.9",
                    "proto", "73"], check=True)  # somebody else's route with our number
    assert {reports.next(RouteEvent).route.prefix for _ in range(2)} == \
        {p("10.1.0.0/26"), p("10.7.0.0/24")}
    desired = {route.prefix: route}
    # A CNI ADD's route is queued just before the resync: it is ours, not drift.
    workload = Route(p("10.1.2.5/32"), "unicast", (), 2, "workload")
    for _ in range(20):
        kernel.apply([workload], [])
        kernel.resync({**desired, workload.prefix: workload}, frozenset())
        kernel.apply([], [workload.prefix])
    first = reports.next(Resynced)
    assert sorted(d.prefix for d in first.drift) == ["10.1.0.0/26", "10.7.0.0/24"]
    for _ in range(19):
        assert reports.next(Resynced).drift == ()
    assert applied(kernel) == []  # a fence: every job before it is done
    assert kernel_routes(ns) == {"10.1.0.0/26": "via 192.0.2.2"}


def test_taken_over_routes_stay_while_kept(ns):
    kernel, reports, taken = start(ns, "10.1.0.0/26", "10.1.0.64/26")
    try:
        assert {str(r.prefix) for r in taken} == {"10.1.0.0/26", "10.1.0.64/26"}
        confirmed = remote(p("10.1.0.0/26"), ["192.0.2.2"])
        kernel.resync({confirmed.prefix: confirmed}, frozenset({p("10.1.0.64/26")}))
        resynced = reports.next(Resynced)
        assert resynced.drift == () and resynced.repaired == 0
        assert set(kernel_routes(ns)) == {"10.1.0.0/26", "10.1.0.64/26"}
        assert applied(kernel, delete=[p("10.1.0.64/26")]) == []  # released
        assert set(kernel_routes(ns)) == {"10.1.0.0/26"}
    finally:
        kernel.stop()


def test_refused_routes_are_reported_and_retried_not_called_drift(ns, writer):
    kernel, reports = writer
    unreachable = remote(p("10.1.0.0/26"), ["198.51.100.1"])
    failures = applied(kernel, [unreachable])
    assert len(failures) == 1 and "unreachable" in str(failures[0])
    assert reports.next(Applied).failures == tuple(failures)
    kernel.resync({unreachable.prefix: unreachable}, frozenset())
    resynced = reports.next(Resynced)
    assert resynced.drift == () and len(resynced.failures) == 1


def test_a_call_keeps_its_place_and_a_guard_that_failed_installs_nothing(ns, writer):
    """The policy table's jobs run in the writer's queue: a guarded batch (an ADD's
    route) is installed only if the job before it (its rules) reported success."""
    from fabric.policy.compiler import PolicyReport

    kernel, _ = writer
    order: list[str] = []
    good: Future = Future()
    bad: Future = Future()

    def rules(report: Future, ok: bool) -> None:
        order.append(f"rules {ok}: {sorted(kernel_routes(ns))}")
        report.set_result(PolicyReport(ok, error="" if ok else "nft refused"))

    kernel.call(lambda: rules(bad, False))
    refused: Future = Future()
    kernel.apply([remote(p("10.2.0.0/26"), ["192.0.2.2"])], [], refused, guard=bad)
    kernel.call(lambda: rules(good, True))
    assert applied(kernel) == []
    installed: Future = Future()
    kernel.apply([remote(p("10.3.0.0/26"), ["192.0.2.2"])], [], installed, guard=good)
    assert [f.route.prefix for f in refused.result(10)] == [p("10.2.0.0/26")]
    assert installed.result(10) == []
    assert order == ["rules False: []", "rules True: []"]  # each ran before the next batch
    assert kernel_routes(ns) == {"10.3.0.0/26": "via 192.0.2.2"}


def test_our_codec_and_pyroute2_read_the_same_routes(ns, writer):
    """pyroute2, an independent netlink implementation, is the oracle for the agent's
    own struct-packed codec: what we wrote is what it reads, field by field."""
    from pyroute2 import NetNS

    made, _ = writer
    index = int(subprocess.run(["ip", "-n", ns, "-o", "link", "show", "a0"],
                               capture_output=True, text=True, check=True).stdout.split(":")[0])
    routes = [remote(p(f"10.244.{i}.0/26"), ["192.0.2.2"]) for i in range(50)]
    routes += [blackhole(p("10.244.200.0/26")),
               Route(p("10.244.201.7/32"), "unicast", (), index, "workload"),
               remote(p("10.244.202.0/26"), ["192.0.2.2", "192.0.2.3"])]
    assert applied(made, routes) == []
    with NetNS(ns) as ipr:
        seen = {}
        for msg in ipr.get_routes(family=2, proto=73):
            dst = f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}"
            hops = sorted([msg.get_attr("RTA_GATEWAY")] if msg.get_attr("RTA_GATEWAY") else
                          [h.get_attr("RTA_GATEWAY") for h in msg.get_attr("RTA_MULTIPATH") or []])
            seen[p(dst)] = (msg["type"], tuple(hops), (msg.get_attr("RTA_OIF") or 0) if not hops
                            else 0)
    expected = {r.prefix: ({"unicast": 1, "blackhole": 6}[r.type], tuple(sorted(r.gateways)),
                           r.oif if not r.gateways else 0) for r in routes}
    assert seen == expected


def test_a_listener_never_receives_the_echoes_of_an_ignored_sender(ns):
    """The kernel drops the echoes of the writer's own changes before they reach the
    listener's socket (a BPF filter on the sender's port id); others' still arrive."""
    from fabric.kernel import netlink

    with entered(netns.path(ns)):
        sender = netlink.RouteSocket(73)
        listener = netlink.RouteSocket(73, groups=netlink.RTMGRP_IPV4_ROUTE)
    try:
        listener.ignore_sender(sender.sock.getsockname()[0])
        routes = [remote(p(f"10.245.{i // 64}.{(i % 64) * 4}/30"), ["192.0.2.2"])
                  for i in range(2000)]
        assert sender.apply(routes) == []
        subprocess.run(["ip", "-n", ns, "route", "add", "10.246.0.0/24", "via", "192.0.2.2",
                        "proto", "73"], check=True)
        received = []
        while batch := listener.events(timeout=0.5):  # no skipping here: all that came
            received += [netlink.route_event(m, 73) for m in batch]
        assert [str(e[1].prefix) for e in received if e] == ["10.246.0.0/24"]
    finally:
        sender.close()
        listener.close()


def test_an_interface_name_held_by_a_detached_pair_is_freed_for_a_new_attach(netns_factory):
    """A DEL detaches the pair and deletes it later (links.disable, then the reaper):
    an ADD of another container into the same namespace meanwhile finds `eth0` taken.
    It deletes the detached pairs and wires; a name a live pair holds stays refused."""
    from fabric.kernel import links
    host, container = netns_factory("kh"), netns_factory("kc")
    with entered(netns.path(host)):
        links.attach(netns.path(container), "eth0", "l3ftestold", ["10.244.9.1"], 1500)
        assert links.disable("l3ftestold")
        made = links.attach(netns.path(container), "eth0", "l3ftestnew", ["10.244.9.2"], 1500)
        assert made.host_ifname == "l3ftestnew"
        assert "l3ftestold" not in links.host_links()
        with pytest.raises(links.LinkError, match="eth0 already exists"):
            links.attach(netns.path(container), "eth0", "l3ftestthird", ["10.244.9.3"], 1500)
    shown = subprocess.run(["ip", "-n", container, "-o", "addr", "show", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert "10.244.9.2/32" in shown
