"""The host agent on real components: 3 (then 4) hosts in namespaces on one underlay,
each with fabric-agent, a real ExaBGP, real etcd, real kernel routes and workloads
attached by the CNI plugin. The tests run in order on one lab and each leaves it as
it found it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from fabric.agent.routing import DEPARTURE_GRACE
from fabric.kernel import netns
from fabric.model.prefix import Prefix
from fabric.store.registry import Registry
from ipam.allocator import Ipam
from tests.conftest import needs_root, running_lab
from tests.support.fabric import (
    agent,
    blocks_of,
    kernel_routes,
    pinging,
    sessions_established,
    status,
    wait_until,
)

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
HOLD_TIME = 9
RESYNC = 3.0
AGENT_ARGS = ["--resync-interval", str(RESYNC), "--lease-ttl", "6", "--gc-interval", "2",
              "--gc-grace", "3"]


@pytest.fixture(scope="module")
def lab():
    with running_lab(pool="10.244.0.0/16") as lab:
        for host in ("h1", "h2", "h3"):
            lab.add_host(host, agent_args=AGENT_ARGS)
        for host in ("h1", "h2", "h3"):
            lab.wait_agent(host)
        for host in ("h1", "h2", "h3"):
            lab.add_workload(host)
        yield lab


def expected_remote(lab, host: str) -> dict[str, str]:
    """What `host`'s kernel must hold for the other hosts' blocks."""
    addresses = {h.name: h.address for h in lab.state.hosts.values()}
    return {cidr: f"via {addresses[owner]}" for cidr, owner in blocks_of(lab).items()
            if owner != host and owner in addresses and lab.state.hosts[owner].alive}


def converged(lab, host: str) -> bool:
    table = kernel_routes(lab.state.hosts[host].netns)
    wanted = expected_remote(lab, host)
    return all(table.get(cidr) == via for cidr, via in wanted.items())


def remote_table(lab, host: str) -> dict[str, str]:
    return {p: v for p, v in kernel_routes(lab.state.hosts[host].netns).items()
            if v.startswith("via")}


def test_each_host_holds_the_others_blocks_via_the_right_next_hop(lab):
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: converged(lab, h), f"{host} learned the other blocks", 10)
        table = kernel_routes(lab.state.hosts[host].netns)
        own = [c for c, owner in blocks_of(lab).items() if owner == host]
        assert own and all(table[c] == "blackhole" for c in own)
        assert len(remote_table(lab, host)) == 2
    w1, w3 = lab.state.workloads["h1-w1"], lab.state.workloads["h3-w1"]
    assert lab.ping(w1.netns, w3.ips[0], count=3)
    assert lab.ping(w3.netns, w1.ips[0], count=3)


def test_workloads_resolve_each_other_by_name(lab):
    result = subprocess.run(["ip", "netns", "exec", lab.state.workloads["h1-w1"].netns,
                             "ping", "-c", "1", "-W", "2", "h3-w1.fabric.internal"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert lab.state.workloads["h3-w1"].ips[0] in result.stdout


def test_route_deleted_or_changed_by_hand_is_repaired(lab):
    ns = lab.state.hosts["h2"].netns
    before = kernel_routes(ns)
    victim = next(p for p, v in before.items() if v.startswith("via"))
    foreign = "10.200.0.0/24"
    subprocess.run(["ip", "-n", ns, "route", "add", foreign, "via", lab.router], check=True)
    subprocess.run(["ip", "-n", ns, "route", "del", victim], check=True)
    wait_until(lambda: kernel_routes(ns).get(victim) == before[victim],
               "the deleted route is back", RESYNC + 2)
    subprocess.run(["ip", "-n", ns, "route", "replace", victim, "via", lab.router, "proto",
                    "73"], check=True)
    wait_until(lambda: kernel_routes(ns).get(victim) == before[victim],
               "the changed route is repaired", RESYNC + 2)
    drift = agent(lab, "h2", "routes")["drift"]
    assert any(d["prefix"] == victim for d in drift)
    time.sleep(RESYNC + 1)  # a full resync later, another protocol's route is untouched
    shown = subprocess.run(["ip", "-n", ns, "route", "show", foreign], capture_output=True,
                           text=True).stdout
    assert "via" in shown
    subprocess.run(["ip", "-n", ns, "route", "del", foreign], check=True)


def test_a_fourth_host_joins_without_restarting_sessions_and_leaves(lab):
    def sessions(host):
        return {p["address"]: (p["since"], p["flaps"]) for p in status(lab, host)["peers"]}

    before = {h: sessions(h) for h in ("h1", "h2", "h3")}
    lab.add_host("h4", agent_args=AGENT_ARGS)
    lab.wait_agent("h4")
    lab.add_workload("h4")
    h4_block = wait_until(lambda: [c for c, o in blocks_of(lab).items() if o == "h4"],
                          "h4 claimed a block")[0]
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: remote_table(lab, h).get(h4_block) == "via " +
                   lab.state.hosts["h4"].address, f"{host} learned h4's block", 10)
        wait_until(lambda h=host: sessions_established(lab, h), f"{host} sessions up", 10)
        after = sessions(host)
        for peer, seen in before[host].items():
            assert after[peer] == seen, f"{host}'s session to {peer} was restarted"
    # h4's agent stops: graceful restart, its peers keep its routes (stale) meanwhile.
    lab.remove_workload("h4-w1")
    lab.stop_agent("h4")
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: any(r["prefix"] == h4_block and r["stale"]
                                      for r in agent(lab, h, "bgp_routes")),
                   f"{host} keeps h4's block as stale", HOLD_TIME)
        assert h4_block in remote_table(lab, host)
    # h4 leaves the fabric for good: its record goes, and with it (once the grace for a
    # record deleted by mistake has passed) its sessions and routes.
    store = lab.store()
    try:
        assert Registry(store).remove_node("h4")
    finally:
        store.close()
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: h4_block not in remote_table(lab, h),
                   f"h4's routes are gone from {host}", DEPARTURE_GRACE + 5)
        wait_until(lambda h=host: "10.99.0.14" not in
                   [p["address"] for p in status(lab, h)["peers"]], f"{host} dropped h4")
    lab.kill_host("h4")


def test_kill_9_of_an_agent_loses_no_ping_and_keeps_the_kernel(lab):
    tables = {h: kernel_routes(lab.state.hosts[h].netns) for h in ("h1", "h2", "h3")}
    with pinging(lab, "h1-w1", "h3-w1") as loss:
        time.sleep(0.5)
        lab.stop_agent("h3", sig=signal.SIGKILL)
        time.sleep(0.5)
        # The agent is gone, ExaBGP died with it; the kernel still forwards.
        assert kernel_routes(lab.state.hosts["h3"].netns) == tables["h3"]
        time.sleep(1.5)
        lab.start_agent("h3")
        lab.wait_agent("h3")
        for host in ("h1", "h2", "h3"):
            wait_until(lambda h=host: sessions_established(lab, h), f"{host} sessions up", 15)
    assert loss.sent > 40 and loss.lost == 0, loss
    wait_until(lambda: status(lab, "h3")["stale_released"], "h3 confirmed its routes", 15)
    for host in ("h1", "h2", "h3"):
        assert kernel_routes(lab.state.hosts[host].netns) == tables[host]


def test_two_agents_killed_together_are_back_within_the_hold_time(lab):
    tables = {h: kernel_routes(lab.state.hosts[h].netns) for h in ("h1", "h2", "h3")}
    for host in ("h1", "h2"):
        lab.stop_agent(host, sig=signal.SIGKILL)
    for host in ("h1", "h2"):
        lab.start_agent(host)
    for host in ("h1", "h2"):
        lab.wait_agent(host)
    # The bounds tell "confirmed by the peers' End-of-RIB" from "waited out the
    # graceful-restart timer" (120 s); they are not speed targets.
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: sessions_established(lab, h), f"{host} sessions up",
                   2 * HOLD_TIME)
    for host in ("h1", "h2"):
        wait_until(lambda h=host: status(lab, h)["stale_released"],
                   f"{host} confirmed its routes", 2 * HOLD_TIME)
        assert status(lab, host)["stale_routes"] == 0
    for host in ("h1", "h2", "h3"):
        assert kernel_routes(lab.state.hosts[host].netns) == tables[host]


def test_exabgp_dying_alone_is_restarted_and_routes_flow_again(lab):
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: sessions_established(lab, h) and converged(lab, h),
                   f"{host} converged", 15)
    before = status(lab, "h2")["bgp_process"]
    block = next(c for c, o in blocks_of(lab).items() if o == "h2")
    tables = {h: kernel_routes(lab.state.hosts[h].netns) for h in ("h1", "h3")}
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: status(lab, "h2")["bgp_process"]["restarts"] > before["restarts"] and
               status(lab, "h2")["bgp_process"]["running"], "the agent restarted ExaBGP", 15)
    assert status(lab, "h2")["bgp_process"]["pid"] != before["pid"]
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: sessions_established(lab, h), f"{host} sessions up", 15)
    for host in ("h1", "h3"):  # h2's block never left their kernels, and is confirmed
        assert kernel_routes(lab.state.hosts[host].netns)[block] == tables[host][block]
        wait_until(lambda h=host: any(r["prefix"] == block and r["best"] and not r["stale"]
                                      for r in agent(lab, h, "bgp_routes")),
                   f"{host} has h2's block fresh again", 10)


def test_clean_shutdown_keeps_routes_and_stops_exabgp(lab):
    ns = lab.state.hosts["h2"].netns
    before = kernel_routes(ns)
    exabgp = status(lab, "h2")["bgp_process"]["pid"]
    lab.stop_agent("h2")  # SIGTERM
    assert kernel_routes(ns) == before
    wait_until(lambda: not netns_has_pid(ns, exabgp), "exabgp stopped with the agent", 5)
    lab.start_agent("h2")
    lab.wait_agent("h2")
    for host in ("h1", "h2", "h3"):
        wait_until(lambda h=host: sessions_established(lab, h) and converged(lab, h),
                   f"{host} back", 15)


def netns_has_pid(ns: str, pid: int) -> bool:
    return pid in netns.pids(ns)


def test_metrics_endpoint(lab):
    host = lab.state.hosts["h1"]
    code = ("import urllib.request;print(urllib.request.urlopen("
            f"'http://{host.address}:9473/metrics', timeout=5).read().decode())")
    out = subprocess.run(["ip", "netns", "exec", host.netns, "python3", "-c", code],
                         capture_output=True, text=True, timeout=30).stdout
    assert 'l3fabric_bgp_sessions{state="Established"} 2' in out
    assert 'l3fabric_bgp_routes_accepted{peer="' in out
    assert 'l3fabric_kernel_routes{kind="remote"} 2' in out
    assert "l3fabric_reconcile_seconds" in out and "l3fabric_etcd_errors_total" in out


def test_nat_outgoing_follows_the_pool_flag(lab):
    workload = lab.state.workloads["h1-w1"]
    assert not lab.ping(workload.netns, lab.router, count=1)  # no route back to the pool
    store = lab.store()
    try:
        Ipam(store).update_pool("default", nat_outgoing=True)
        wait_until(lambda: lab.ping(workload.netns, lab.router, count=1),
                   "NAT lets the workload reach outside the pools", 10)
        # Between workloads nothing is translated: the source stays the pool address.
        other = lab.state.workloads["h2-w1"]
        assert lab.ping(workload.netns, other.ips[0])
        Ipam(store).update_pool("default", nat_outgoing=False)
        wait_until(lambda: not lab.ping(workload.netns, lab.router, count=1),
                   "NAT is removed with the flag", 10)
    finally:
        store.close()


def test_the_agent_garbage_collects_leaked_addresses(lab):
    store = lab.store()
    try:
        ipam = Ipam(store)
        # An allocation whose container never registered (its ADD died half-way), and
        # one whose network namespace still exists: only the first may go.
        leaked = ipam.allocate("leaked.eth0", "h1", attrs={"netns": "/run/netns/gone"})
        alive_ns = lab.state.workloads["h1-w1"].netns
        ipam.allocate("busy.eth0", "h1", attrs={"netns": netns.path(alive_ns)})
        assert leaked.addresses()
        wait_until(lambda: ipam.handle("leaked.eth0") is None,
                   "the agent's GC released the leak after its grace period", 20)
        assert ipam.handle("busy.eth0") is not None
        ipam.release("busy.eth0")
    finally:
        store.close()


def test_borrowed_addresses_are_announced_and_routed():
    """Two blocks of four: h2 fills its own, then borrows from h1's block; h2 announces
    the /32, and h1 (whose blackhole covers that block) routes it to h2."""
    with running_lab(pool="10.245.0.0/29", block_size=30) as small:
        for host in ("h1", "h2"):
            small.add_host(host)
        for host in ("h1", "h2"):
            small.wait_agent(host)
        first = small.add_workload("h1")
        for _ in range(4):
            small.add_workload("h2")
        borrowed = small.add_workload("h2")
        h1_block = next(c for c, o in blocks_of(small).items() if o == "h1")
        address = borrowed.ips[0]
        assert Prefix.parse(h1_block).contains(Prefix.parse(address))
        h1 = small.state.hosts["h1"]
        wait_until(lambda: kernel_routes(h1.netns).get(f"{address}/32") ==
                   f"via {small.state.hosts['h2'].address}", "h1 routes the borrowed /32", 10)
        assert kernel_routes(h1.netns)[h1_block] == "blackhole"
        assert agent(small, "h2", "status")["exports"] == sorted(
            [next(c for c, o in blocks_of(small).items() if o == "h2"), f"{address}/32"])
        assert small.ping(first.netns, address, count=2)
        assert small.ping(borrowed.netns, first.ips[0], count=2)
        # Released: h2 withdraws the /32 (a reload alone would not) and h1 forgets it.
        small.remove_workload(borrowed.name)
        wait_until(lambda: f"{address}/32" not in kernel_routes(h1.netns),
                   "h2 withdrew the borrowed /32", 10)


def test_etcd_outage_keeps_forwarding_and_defers_new_containers():
    """etcd dies: traffic keeps flowing, a new container gets "try again later" and
    leaves nothing behind; etcd comes back: the agents recover by themselves."""
    from cni import invoke

    with running_lab(pool="10.244.0.0/16") as outage:
        for host in ("h1", "h2"):
            outage.add_host(host, agent_args=["--lease-ttl", "30"])
        for host in ("h1", "h2"):
            outage.wait_agent(host)
        a, b = outage.add_workload("h1"), outage.add_workload("h2")
        wait_until(lambda: outage.ping(a.netns, b.ips[0]), "cross-host ping", 15)
        from fabric.processes import kill_pid

        kill_pid(outage.state.etcd_pid)
        assert outage.ping(a.netns, b.ips[0], count=3)
        h1 = outage.state.hosts["h1"]
        container = f"{outage.name}-late"
        netns.create(container)
        links_before = subprocess.run(["ip", "-n", h1.netns, "-o", "link"],
                                      capture_output=True, text=True).stdout
        late = invoke.run(str(outage.cni_bin / "l3fabric"), "ADD",
                          invoke.network_config(outage.conflist()), container_id=container,
                          netns=netns.path(container), host_netns=netns.path(h1.netns))
        assert late.document["code"] == 11, late.stdout
        assert "etcd is unreachable" in late.document["msg"]
        assert subprocess.run(["ip", "-n", h1.netns, "-o", "link"], capture_output=True,
                              text=True).stdout == links_before
        outage.start_etcd()  # same data directory: the same fabric comes back
        retried = wait_until(lambda: (r := invoke.run(
            str(outage.cni_bin / "l3fabric"), "ADD", invoke.network_config(outage.conflist()),
            container_id=container, netns=netns.path(container),
            host_netns=netns.path(h1.netns))).ok and r, "ADD works again", 30)
        address = retried.document["ips"][0]["address"].split("/")[0]
        assert outage.ping(container, b.ips[0], count=2)
        wait_until(lambda: status(outage, "h2")["registration"]["healthy"] and
                   sessions_established(outage, "h2"), "h2 healthy again", 30)
        assert address not in a.ips + b.ips


def test_a_taken_dns_port_does_not_keep_the_node_out():
    import socket

    from fabric.kernel.netns import entered

    with running_lab(pool="10.244.0.0/16") as busy:
        host = busy.add_host("h1", start=False)
        with entered(netns.path(host.netns)):
            squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            squatter.bind((host.address, 53))
            busy.start_agent("h1")
            assert busy.wait_agent("h1")["registration"]["healthy"]
            workload = busy.add_workload("h1")
            assert busy.ping(workload.netns, host.address)
            log = (busy.dir / "h1" / "agent.log").read_text()
            assert "workload DNS not served" in log
        finally:
            squatter.close()
