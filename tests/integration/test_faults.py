"""Faults a hostile but realistic operator causes, on a 3-host lab.

Each test breaks one thing while workloads ping each other across hosts, then checks
what the design promises: pings between containers on other hosts lose nothing (or
only what is named), `ipam check` is clean (it cross-checks registrations against
allocations), and every agent is healthy: all its threads alive, its loop beating.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cni import invoke
from fabric.agent.routing import DEPARTURE_GRACE
from fabric.kernel import links, netns
from fabric.processes import kill_pid
from fabric.store import keys
from fabric.store.datastore import delete
from ipam.allocator import Ipam
from ipam.blocks import ordinal_of
from ipam.check import check
from tests.conftest import needs_root, running_lab
from tests.support.fabric import kernel_routes, pinging, status, wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
HOSTS = ("h1", "h2", "h3")
AGENT_ARGS = ["--resync-interval", "2", "--lease-ttl", "6", "--gc-interval", "2",
              "--gc-grace", "3", "--gone-grace", "4", "--host-check-interval", "2"]


@pytest.fixture(scope="module")
def lab():
    with running_lab(pool="10.244.0.0/16", nat_outgoing=True) as lab:
        for host in HOSTS:
            lab.add_host(host, agent_args=AGENT_ARGS)
        for host in HOSTS:
            lab.wait_agent(host)
        for host in HOSTS:
            lab.add_workload(host)
        yield lab


@pytest.fixture(autouse=True)
def settled(lab):
    """Every test starts from, and must leave, a healthy fabric."""
    wait_healthy(lab)
    yield
    wait_healthy(lab)
    assert ipam_problems(lab) == []


def wait_healthy(lab, timeout: float = 30.0) -> None:
    for host in HOSTS:
        wait_until(lambda h=host: healthy(lab, h), f"{host}'s agent healthy, sessions up",
                   timeout)


def healthy(lab, host: str) -> bool:
    try:
        doc = status(lab, host)
    except Exception:
        return False
    return doc["health"]["healthy"] and all(p["state"] == "Established" for p in doc["peers"])


def ipam_problems(lab) -> list[str]:
    store = lab.store()
    try:
        report = check(Ipam(store).snapshot())
    finally:
        store.close()
    return [f"{f.kind} {f.subject}: {f.detail}" for f in report.findings]


def cni(lab, host: str, command: str, container: str, workload_netns: str,
        ifname: str = "eth0") -> invoke.Outcome:
    return invoke.run(str(lab.cni_bin / "l3fabric"), command,
                      invoke.network_config(lab.conflist()), container_id=container,
                      netns=workload_netns, ifname=ifname,
                      host_netns=netns.path(lab.state.hosts[host].netns))


def etcd_pid(lab) -> int:
    return lab.refresh().etcd_pid


# -- etcd --------------------------------------------------------------------------------
def test_etcd_killed_during_adds_and_pings_then_restarted(lab, netns_factory):
    before = {h: status(lab, h)["health"]["threads"] for h in HOSTS}
    spare = netns.path(netns_factory("e"))
    with pinging(lab, "h1-w1", "h3-w1") as loss:
        kill_pid(etcd_pid(lab), sig=signal.SIGKILL)
        time.sleep(1)
        outcome = cni(lab, "h2", "ADD", "faultetcd", spare)
        assert outcome.status == 1 and outcome.document["code"] == 11, outcome.stdout
        assert cni(lab, "h2", "DEL", "faultetcd", spare).document["code"] == 11
        time.sleep(8)  # longer than the liveness lease: nodes must not vanish
        for host in HOSTS:
            doc = status(lab, host)
            assert doc["health"]["threads"] == before[host], "a thread died"
            assert not doc["registration"]["healthy"]
            assert all(p["state"] == "Established" for p in doc["peers"])
        lab.start_etcd()
    assert loss.lost == 0, loss
    wait_healthy(lab)
    outcome = cni(lab, "h2", "ADD", "faultetcd", spare)
    assert outcome.ok, outcome.stdout
    assert cni(lab, "h2", "DEL", "faultetcd", spare).ok


def test_etcd_frozen_longer_than_a_lease(lab):
    pid = etcd_pid(lab)
    with pinging(lab, "h2-w1", "h1-w1") as loss:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(10)  # the liveness lease (6 s) runs out meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
    assert loss.lost == 0, loss
    wait_healthy(lab)
    store = lab.store()
    try:
        assert sorted(keys.last_segment(k) for k in store.keys(keys.NODES)) == list(HOSTS)
    finally:
        store.close()


# -- agents ------------------------------------------------------------------------------
def test_agent_kill_9_is_restarted_and_loses_no_ping(lab):
    old = lab.state.hosts["h2"].agent_pid
    with pinging(lab, "h1-w1", "h2-w1") as loss:
        os.kill(old, signal.SIGKILL)  # the lab's supervisor starts a new agent
        wait_until(lambda: lab.refresh().hosts["h2"].agent_pid not in (None, old),
                   "a new agent for h2", 20)
        wait_healthy(lab)
        wait_until(lambda: status(lab, "h2")["stale_released"], "h2 confirmed its routes",
                   20)
    assert loss.lost == 0, loss
    assert status(lab, "h2")["bgp_process"]["restarts"] == 0  # ExaBGP started first time


def test_agent_kill_9_without_restart_keeps_routes_for_the_restart_time(lab):
    with pinging(lab, "h1-w1", "h3-w1") as loss:
        lab.stop_agent("h3", sig=signal.SIGKILL)
        time.sleep(12)  # longer than the hold time: graceful restart, not hold expiry
        for host in ("h1", "h2"):
            stale = next(r for r in status(lab, host)["peers"]
                         if r["address"] == lab.state.hosts["h3"].address)
            assert stale["stale_until"] is not None
    assert loss.lost == 0, loss  # h3's kernel forwards; its peers kept its routes
    lab.start_agent("h3")


def test_an_agent_that_leaves_takes_its_routes_with_it_at_once(lab):
    """SIGUSR2, which fabric-agent.service sends when the machine shuts down: the agent
    withdraws its routes before it stops, so peers drop them at once, where a plain
    stop (or kill -9, above) leaves them stale for the restart time."""
    h3 = lab.state.hosts["h3"].address

    def via_h3(host: str) -> list[str]:
        routes = kernel_routes(lab.state.hosts[host].netns)
        return [prefix for prefix, how in routes.items() if f"via {h3} " in how + " "]

    for host in ("h1", "h2"):  # first in the module, the lab may still be converging
        wait_until(lambda h=host: via_h3(h), f"{host} has h3's routes", 15)
    lab.stop_agent("h3", sig=signal.SIGUSR2)
    for host in ("h1", "h2"):
        # Withdrawn: gone long before the restart time (120 s) or even the hold time.
        wait_until(lambda h=host: not via_h3(h), f"{host} dropped h3's routes", 5)
    # The stop waited for ExaBGP to take the withdrawals, not for its timeout.
    log = Path(lab.state.hosts["h3"].run_dir, "agent.log").read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "leaving: withdrew our routes" and e.get("answered") is True
               for e in events), log[-2000:]
    lab.start_agent("h3")


def test_a_second_agent_for_the_same_node_exits_touching_nothing(lab):
    host = lab.state.hosts["h2"]
    before = status(lab, "h2")
    with pinging(lab, "h1-w1", "h2-w1") as loss:
        second = subprocess.run(["ip", "netns", "exec", host.netns,
                                 *lab.agent_argv(host)], capture_output=True, text=True,
                                timeout=60)
    assert second.returncode == 1
    assert "another fabric-agent" in second.stderr, second.stderr
    after = status(lab, "h2")
    assert after["bgp_process"]["pid"] == before["bgp_process"]["pid"]
    assert after["started_at"] == before["started_at"]
    assert loss.lost == 0, loss


def test_exabgp_killed_again_and_again_loses_no_ping(lab):
    """Each ExaBGP death is a silent loss to the peers (graceful restart): routes stay.
    Killed at random moments (start-up, API connecting, sessions opening), the agent
    must restart it every time and stay the same, healthy agent."""
    agent_pid = lab.refresh().hosts["h3"].agent_pid
    rng = random.Random(7)
    with pinging(lab, "h1-w1", "h3-w1") as loss:
        for _ in range(15):
            pid = status(lab, "h3")["bgp_process"]["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(rng.uniform(0.05, 0.9))
        wait_until(lambda: status(lab, "h3")["bgp_process"]["connected"], "a new ExaBGP", 20)
        wait_healthy(lab)
    assert loss.lost == 0, loss
    assert lab.refresh().hosts["h3"].agent_pid == agent_pid  # never died itself


# -- records deleted behind the agents' backs --------------------------------------------
def test_node_record_deleted_behind_its_agents_back(lab):
    store = lab.store()
    try:
        with pinging(lab, "h1-w1", "h2-w1") as loss:
            assert store.delete(keys.node("h2"))
            wait_until(lambda: store.get(keys.node("h2")) is not None,
                       "h2 registered again", 10)
            time.sleep(DEPARTURE_GRACE + 1)  # its peers would have dropped it by now
        assert loss.lost == 0, loss
    finally:
        store.close()


def test_workload_record_deleted_while_its_container_lives(lab):
    workload = lab.state.workloads["h2-w1"]
    handle = f"{workload.container_id}.eth0"
    store = lab.store()
    try:
        with pinging(lab, "h1-w1", "h2-w1") as loss:
            assert store.delete(keys.workload("h2", handle))
            wait_until(lambda: store.get(keys.workload("h2", handle)) is not None,
                       "the registration restored from IPAM", 20)
        assert loss.lost == 0, loss
    finally:
        store.close()
    assert lab.ping(lab.state.workloads["h3-w1"].netns, workload.ips[0], count=2)


def test_a_container_gone_without_a_del_gives_its_address_back(lab, netns_factory):
    """As after a reboot: the namespace (and with it the veth) goes, no DEL comes."""
    name = netns_factory("g")
    added = cni(lab, "h2", "ADD", "faultgone", netns.path(name))
    assert added.ok, added.stdout
    store = lab.store()
    try:
        assert Ipam(store).handle("faultgone.eth0") is not None
        subprocess.run(["ip", "netns", "del", name], check=True)
        wait_until(lambda: Ipam(store).handle("faultgone.eth0") is None,
                   "its addresses released after the grace (4 s)", 30)
        assert store.get(keys.workload("h2", "faultgone.eth0")) is None
    finally:
        store.close()


def test_a_host_link_deleted_by_hand_keeps_the_living_containers_address(lab,
                                                                        netns_factory):
    """Its veth is gone but its namespace is not: the container lives on with its
    address configured, so that address must not be given to another container."""
    name = netns_factory("k")
    added = cni(lab, "h2", "ADD", "faultkept", netns.path(name))
    assert added.ok, added.stdout
    store = lab.store()
    try:
        subprocess.run(["ip", "-n", lab.state.hosts["h2"].netns, "link", "del",
                        links.host_ifname("faultkept.eth0")], check=True)
        time.sleep(12)  # three gone-graces (4 s), with link listings every 2 s
        assert Ipam(store).handle("faultkept.eth0") is not None
        assert store.get(keys.workload("h2", "faultkept.eth0")) is not None
    finally:
        store.close()
    assert cni(lab, "h2", "DEL", "faultkept", netns.path(name)).ok


def test_a_block_record_deleted_by_hand_is_restored(lab):
    store = lab.store()
    try:
        block = next(b for b in Ipam(store).blocks() if b.affinity == "h3")
        assert store.delete(keys.block(block.cidr))
        wait_until(lambda: store.get(keys.block(block.cidr)) is not None,
                   "h3 restored its block's record", 15)
        assert Ipam(store).blocks_of("h3")[0].cidr == block.cidr
        via = f"via {lab.state.hosts['h3'].address}"
        wait_until(lambda: kernel_routes(lab.state.hosts["h1"].netns).get(block.cidr) == via,
                   "h1 routes the block to h3 again", 15)
    finally:
        store.close()
    assert lab.ping(lab.state.workloads["h1-w1"].netns,
                    lab.state.workloads["h3-w1"].ips[0], count=2)


def test_a_live_container_etcd_forgot_is_adopted_and_its_address_never_reissued(
        lab, netns_factory):
    """As after restoring etcd from a backup older than the container: its handle,
    address and registration are gone, its veth and route are not."""
    name = netns_factory("r")
    added = cni(lab, "h2", "ADD", "faultold", netns.path(name))
    address = added.document["ips"][0]["address"].split("/")[0]
    store = lab.store()
    try:
        held = Ipam(store).handle("faultold.eth0")
        allocation = held.allocations[0]
        store.txn([], [delete(keys.handle("faultold.eth0")),
                       delete(keys.workload("h2", "faultold.eth0")),
                       delete(keys.ip(allocation.block, ordinal_of(allocation.block,
                                                                     address)))])
        link = links.host_ifname("faultold.eth0")
        wait_until(lambda: Ipam(store).handle(f"adopted.{link}") is not None,
                   "the live interface adopted", 30)
        assert Ipam(store).handle(f"adopted.{link}").addresses() == (address,)
        assert ipam_problems(lab) == []
    finally:
        store.close()
    assert lab.ping(lab.state.workloads["h1-w1"].netns, address, count=2)
    subprocess.run(["ip", "netns", "del", name], check=True)  # it goes: so does its record
    store = lab.store()
    try:
        wait_until(lambda: Ipam(store).handle(f"adopted.{link}") is None,
                   "the adopted record released with its interface", 30)
    finally:
        store.close()


def test_an_add_that_replaces_an_adopted_link_releases_its_addresses(lab, netns_factory):
    """The runtime re-ADDs a container whose records etcd lost (adopted meanwhile): the
    new pair replaces the adopted link, so the adopted addresses go with it."""
    name = netns_factory("a")
    added = cni(lab, "h2", "ADD", "faultre", netns.path(name))
    old = added.document["ips"][0]["address"].split("/")[0]
    link = links.host_ifname("faultre.eth0")
    store = lab.store()
    try:
        allocation = Ipam(store).handle("faultre.eth0").allocations[0]
        store.txn([], [delete(keys.handle("faultre.eth0")),
                       delete(keys.workload("h2", "faultre.eth0")),
                       delete(keys.ip(allocation.block, ordinal_of(allocation.block, old)))])
        wait_until(lambda: Ipam(store).handle(f"adopted.{link}") is not None,
                   "the live interface adopted", 30)
        again = cni(lab, "h2", "ADD", "faultre", netns.path(name))
        assert again.ok, again.stdout
        assert Ipam(store).handle(f"adopted.{link}") is None
        assert store.get(keys.workload("h2", f"adopted.{link}")) is None
        new = again.document["ips"][0]["address"].split("/")[0]
        assert lab.ping(lab.state.workloads["h1-w1"].netns, new, count=2)
        assert new != old  # allocated while the adopted handle still held the old one
        assert f"{old}/32" not in kernel_routes(lab.state.hosts["h2"].netns)
    finally:
        store.close()
    assert cni(lab, "h2", "DEL", "faultre", netns.path(name)).ok


def test_forwarding_and_outgoing_nat_turned_off_by_hand_are_put_back(lab):
    ns = lab.state.hosts["h1"].netns
    flush = ["iptables", "-t", "nat", "-F"]
    subprocess.run(["ip", "netns", "exec", ns, *flush], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-X"], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"],
                   check=True)

    def nat_rules() -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S"],
                              capture_output=True, text=True).stdout

    wait_until(lambda: "-A POSTROUTING -j L3FABRIC-NAT-OUTGOING" in nat_rules()
               and "MASQUERADE" in nat_rules(), "the NAT chain and its hook back", 15)
    forwarding = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n",
                                 "net.ipv4.ip_forward"], capture_output=True, text=True)
    assert forwarding.stdout.strip() == "1"
    assert "ip_forward" in status(lab, "h1")["last_host_repair"]
    assert lab.ping(lab.state.workloads["h2-w1"].netns, lab.state.workloads["h1-w1"].ips[0],
                    count=2)


# -- the CNI plugin misused --------------------------------------------------------------
def test_ten_concurrent_adds_of_one_container_agree(lab, netns_factory):
    space = netns.path(netns_factory("d"))
    with ThreadPoolExecutor(max_workers=10) as pool:
        outcomes = list(pool.map(lambda _: cni(lab, "h1", "ADD", "faultdup", space),
                                 range(10)))
    assert [o.status for o in outcomes] == [0] * 10, [o.stdout for o in outcomes]
    addresses = {o.document["ips"][0]["address"] for o in outcomes}
    assert len(addresses) == 1, addresses
    address = addresses.pop().split("/")[0]
    assert ipam_problems(lab) == []
    assert lab.ping(lab.state.workloads["h2-w1"].netns, address, count=2)
    time.sleep(5)  # two link listings: nothing of it is called an orphan
    assert lab.ping(lab.state.workloads["h2-w1"].netns, address, count=2)
    assert cni(lab, "h1", "DEL", "faultdup", space).ok


def test_del_and_add_against_the_host_namespace_touch_nothing(lab):
    host = lab.state.hosts["h1"]
    with pinging(lab, "h2-w1", "h1-w1") as loss:
        # The plugin runs in the host's namespace: /proc/self/ns/net is the host's own.
        for ifname in ("eth0", "lo"):
            outcome = invoke.run(str(lab.cni_bin / "l3fabric"), "DEL",
                                 invoke.network_config(lab.conflist()),
                                 container_id="faulthost", netns="/proc/self/ns/net",
                                 ifname=ifname, host_netns=netns.path(host.netns))
            assert outcome.ok, outcome.stdout
        refused = invoke.run(str(lab.cni_bin / "l3fabric"), "ADD",
                             invoke.network_config(lab.conflist()), container_id="faulthost",
                             netns="/proc/self/ns/net", host_netns=netns.path(host.netns))
        assert refused.document["code"] == 4 and "host's own" in refused.document["msg"]
    links = subprocess.run(["ip", "-n", host.netns, "-o", "link"], capture_output=True,
                           text=True, check=True).stdout
    assert " eth0@" in links
    assert loss.lost == 0, loss
    assert kernel_routes(host.netns)
