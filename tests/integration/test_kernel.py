"""The kernel reconciler against a real kernel, in a namespace of its own."""

from __future__ import annotations

import subprocess

import pytest

from fabric.kernel import netns
from fabric.kernel.netns import entered
from fabric.kernel.reconciler import Reconciler
from fabric.kernel.routes import blackhole, remote
from fabric.model.prefix import Prefix
from tests.conftest import needs_root
from tests.support.fabric import kernel_routes, wait_until

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture
def ns(netns_factory):
    name = netns_factory("k")
    for command in (["link", "add", "a0", "type", "veth", "peer", "name", "a1"],
                    ["addr", "add", "192.0.2.1/24", "dev", "a0"],
                    ["link", "set", "a0", "up"], ["link", "set", "a1", "up"]):
        subprocess.run(["ip", "-n", name, *command], check=True)
    return name


@pytest.fixture
def reconciler(ns):
    with entered(netns.path(ns)):
        made = Reconciler(73, resync_interval=1.0)
        made.start()  # its threads are created here, so they live in the namespace too
    yield made
    made.stop()


def p(text: str) -> Prefix:
    return Prefix.parse(text)


def test_changes_are_applied_and_other_protocols_left_alone(ns, reconciler):
    subprocess.run(["ip", "-n", ns, "route", "add", "10.9.0.0/24", "via", "192.0.2.254"],
                   check=True)
    reconciler.update("learned", {p("10.1.0.0/26"): remote(p("10.1.0.0/26"), ["192.0.2.2"]),
                                  p("10.1.0.64/26"): remote(p("10.1.0.64/26"),
                                                            ["192.0.2.3", "192.0.2.2"])})
    reconciler.update("blackholes", {p("10.1.1.0/26"): blackhole(p("10.1.1.0/26"))})
    wait_until(lambda: kernel_routes(ns) == {"10.1.0.0/26": "via 192.0.2.2",
                                             "10.1.0.64/26": "via 192.0.2.2 192.0.2.3",
                                             "10.1.1.0/26": "blackhole"}, "routes installed")
    reconciler.update("learned", {p("10.1.0.0/26"): None})
    wait_until(lambda: "10.1.0.0/26" not in kernel_routes(ns), "route removed")
    reconciler.request_resync()
    wait_until(lambda: reconciler.stats.resyncs >= 2, "a resync ran")
    assert "10.9.0.0/24 via 192.0.2.254" in subprocess.run(
        ["ip", "-n", ns, "route"], capture_output=True, text=True).stdout


def test_drift_is_repaired_and_recorded(ns, reconciler):
    route = remote(p("10.1.0.0/26"), ["192.0.2.2"])
    reconciler.update("learned", {route.prefix: route})
    wait_until(lambda: "10.1.0.0/26" in kernel_routes(ns), "installed")
    subprocess.run(["ip", "-n", ns, "route", "del", "10.1.0.0/26"], check=True)
    wait_until(lambda: kernel_routes(ns).get("10.1.0.0/26") == "via 192.0.2.2",
               "repaired", 3)
    subprocess.run(["ip", "-n", ns, "route", "add", "10.7.0.0/24", "via", "192.0.2.9",
                    "proto", "73"], check=True)  # somebody else's route with our number
    wait_until(lambda: "10.7.0.0/24" not in kernel_routes(ns), "unwanted route removed", 3)
    assert {d.prefix for d in reconciler.drift} >= {"10.1.0.0/26", "10.7.0.0/24"}


def test_taken_over_routes_stay_until_released(ns):
    for prefix in ("10.1.0.0/26", "10.1.0.64/26"):
        subprocess.run(["ip", "-n", ns, "route", "add", prefix, "via", "192.0.2.2", "proto",
                        "73"], check=True)
    with entered(netns.path(ns)):
        reconciler = Reconciler(73, resync_interval=0.5)
        assert reconciler.take_over() == 2
        reconciler.start()
    try:
        # A peer confirms one of them; nothing wants the other yet.
        reconciler.update("learned", {p("10.1.0.0/26"): remote(p("10.1.0.0/26"),
                                                               ["192.0.2.2"])})
        reconciler.request_resync()
        wait_until(lambda: reconciler.stats.resyncs >= 2, "resyncs ran")
        assert set(kernel_routes(ns)) == {"10.1.0.0/26", "10.1.0.64/26"}
        assert reconciler.stale() == {p("10.1.0.64/26")}
        assert reconciler.release_stale() == 1
        wait_until(lambda: set(kernel_routes(ns)) == {"10.1.0.0/26"}, "stale route gone")
    finally:
        reconciler.stop()


def test_refused_routes_are_reported(ns, reconciler):
    failures = reconciler.install_now("learned", {
        p("10.1.0.0/26"): remote(p("10.1.0.0/26"), ["198.51.100.1"])})  # unreachable
    assert len(failures) == 1 and "unreachable" in str(failures[0])
    assert str(p("10.1.0.0/26")) in {str(k) for k in reconciler.failed}
    assert reconciler.stats.failures >= 1  # the background resync may have retried it
