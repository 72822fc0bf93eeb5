"""What a big fabric leans on, at small scale: a 3-member etcd that loses a member, and
two route reflectors that lose one, while containers ping and new ones are added."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni import invoke
from fabric.kernel import netns
from fabric.lab.topology import Lab, sample_pairs
from ipam.allocator import Ipam
from ipam.check import check
from tests.conftest import lab_name, needs_root
from tests.support.fabric import blocks_of, kernel_routes, pinging, status, wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]


@contextlib.contextmanager
def lab_with(members: int = 1, reflectors: int = 0, hosts: int = 3) -> Iterator[Lab]:
    lab = Lab(lab_name())
    lab.down()
    try:
        lab.create_underlay()
        lab.start_etcd(members)
        lab.add_pool("default", "10.244.0.0/16")
        for index in range(1, hosts + 1):
            lab.add_host(f"h{index}", rr_cluster_id=f"10.255.0.{index}"
                         if index <= reflectors else None)
        for index in range(1, hosts + 1):
            lab.wait_agent(f"h{index}")
        yield lab
    finally:
        lab.down()


def test_an_etcd_member_lost_during_adds_fails_no_add_and_comes_back(netns_factory):
    with lab_with(members=3) as lab:
        for host in ("h1", "h2", "h3"):
            lab.add_workload(host)
        spaces = [netns.path(netns_factory(f"e{i}")) for i in range(12)]

        def add(index: int) -> invoke.Outcome:
            host = f"h{index % 3 + 1}"
            for attempt in range(2):  # a runtime retries code 11 (once here, after 2 s)
                if attempt:
                    time.sleep(2)
                outcome = invoke.run(str(lab.cni_bin / "l3fabric"), "ADD",
                                     invoke.network_config(lab.conflist()),
                                     container_id=f"etcdloss{index}", netns=spaces[index],
                                     host_netns=netns.path(lab.state.hosts[host].netns))
                if outcome.ok or outcome.document.get("code") != 11:
                    return outcome
            return outcome

        with pinging(lab, "h1-w1", "h3-w1") as loss, ThreadPoolExecutor(4) as pool:
            first = pool.map(add, range(6))
            lab.kill_etcd("etcd-1")  # the member the agents are talking to first
            outcomes = list(first) + list(pool.map(add, range(6, 12)))
        assert [o.status for o in outcomes] == [0] * 12, [o.stdout for o in outcomes]
        addresses = [o.document["ips"][0]["address"] for o in outcomes]
        assert len(set(addresses)) == 12  # no duplicate
        assert loss.lost == 0, loss  # no route lost
        store = lab.store()
        try:
            assert check(Ipam(store).snapshot()).findings == []
        finally:
            store.close()
        lab.restart_etcd("etcd-1")
        health = subprocess.run(
            ["etcdctl", "--endpoints", lab.etcd_local_endpoint, "endpoint", "health"],
            capture_output=True, text=True, env={"ETCDCTL_API": "3"}, timeout=30)
        assert (health.stdout + health.stderr).count("is healthy") == 3, health.stderr


def test_losing_one_of_two_route_reflectors_loses_no_route():
    with lab_with(reflectors=2, hosts=4) as lab:
        for host in ("h3", "h4"):
            lab.add_workload(host)
        clients = ("h3", "h4")
        for host in clients:
            kinds = sorted(p["kind"] for p in status(lab, host)["peers"])
            assert kinds == ["reflector", "reflector"]  # clients peer with reflectors only
        block = next(c for c, o in blocks_of(lab).items() if o == "h4")
        via = f"via {lab.state.hosts['h4'].address}"
        wait_until(lambda: kernel_routes(lab.state.hosts["h3"].netns).get(block) == via,
                   "h3 learned h4's block through the reflectors", 20)
        with pinging(lab, "h3-w1", "h4-w1") as loss:
            lab.kill_host("h1")  # a reflector dies; its sessions expire after the hold time
            time.sleep(12)
            assert kernel_routes(lab.state.hosts["h3"].netns).get(block) == via
        assert loss.lost == 0, loss


def test_a_reachability_sample_has_every_host_as_source_and_destination():
    from fabric.lab.topology import WorkloadState

    workloads = [WorkloadState(f"h{h}-w{w}", f"h{h}", "", "") for h in range(1, 8)
                 for w in (1, 2)]
    pairs = sample_pairs(workloads)
    assert len(pairs) <= 2 * len(workloads)  # linear, not quadratic
    assert {a.host for a, _ in pairs} == {b.host for _, b in pairs} == {w.host for w in workloads}
    assert all(a.host != b.host for a, b in pairs)  # every ping crosses hosts
