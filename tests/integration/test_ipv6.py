"""IPv6 end to end: dual-stack and IPv6-only 3-host labs with real agents and ExaBGP.

Every container reaches every other over each family, by ping and by TCP; each
host's blocks are learned over BGP sessions of that family and sit in the kernel via
the owner's underlay address of that family.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fabric.lab.topology import IP_FAMILIES
from tests.conftest import needs_root, running_lab
from tests.support.fabric import agent, blocks_of, kernel_routes, status, wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
HOSTS = ("h1", "h2", "h3")
PORT = 8080
# Answers each connection with "ok" (IPv4 and IPv6: one dual-stack socket).
SERVER = ("import socket\n"
          "s = socket.socket(socket.AF_INET6)\n"
          "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          f"s.bind(('::', {PORT})); s.listen(64)\n"
          "while True:\n"
          "    c, _ = s.accept(); c.sendall(b'ok'); c.close()\n")
CLIENT = ("import socket, sys\n"
          f"c = socket.create_connection((sys.argv[1], {PORT}), timeout=3)\n"
          "sys.exit(0 if c.recv(2) == b'ok' else 1)\n")


@pytest.fixture(scope="module", params=["dual", "ipv6"])
def lab(request):
    families = IP_FAMILIES[request.param]
    with running_lab(pool="10.244.0.0/16" if 4 in families else None, families=families,
                     pool6="fd00:244::/64") as lab:
        for host in HOSTS:
            lab.add_host(host)
        for host in HOSTS:
            lab.wait_agent(host)
        servers = []
        try:
            for host in HOSTS:
                workload = lab.add_workload(host)
                servers.append(subprocess.Popen(
                    ["ip", "netns", "exec", workload.netns, sys.executable, "-c", SERVER]))
            yield lab
        finally:
            for server in servers:
                server.kill()
                server.wait()


def address(workload, family: int) -> str:
    return next(ip for ip in workload.ips if (":" in ip) == (family == 6))


def tcp(lab, source, target: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", source.netns, sys.executable, "-c", CLIENT,
                           target], capture_output=True, timeout=30).returncode == 0


def test_every_container_reaches_every_other_over_each_family(lab):
    workloads = list(lab.state.workloads.values())
    assert all(len(w.ips) == len(lab.families) for w in workloads)
    for family in lab.families:
        matrix = wait_until(lambda f=family: (m := lab.matrix(f)) and
                            all(all(row.values()) for row in m.values()) and m,
                            f"every IPv{family} ping answered", 30)
        assert len(matrix) == 3
        deadline = time.monotonic() + 10
        for source in workloads:
            for target in workloads:
                if source is target:
                    continue
                while not tcp(lab, source, address(target, family)):
                    assert time.monotonic() < deadline, (
                        f"TCP {source.name} -> {target.name} over IPv{family}")
                    time.sleep(0.2)


def test_blocks_are_learned_over_sessions_of_their_family(lab):
    owners = blocks_of(lab)
    hosts = lab.state.hosts
    for name in HOSTS:
        doc = status(lab, name)
        families = {p["family"] for p in doc["peers"]}
        assert families == {f"ipv{f}" for f in lab.families}
        assert all(p["state"] == "Established" for p in doc["peers"])
        received = {r["prefix"]: r for r in agent(lab, name, "bgp_routes")}
        v6_table = kernel_routes(hosts[name].netns, family=6)
        for cidr, owner in owners.items():
            if owner == name:
                continue
            row = received[cidr]
            ipv6 = ":" in cidr
            expected = hosts[owner].ipv6 if ipv6 else hosts[owner].ipv4
            assert (row["peer"], row["next_hop"], row["best"]) == (expected, expected, True)
            table = v6_table if ipv6 else kernel_routes(hosts[name].netns)
            assert table[cidr] == f"via {expected}"
        own6 = [c for c, o in owners.items() if o == name and ":" in c]
        assert own6 and all(v6_table[c] == "blackhole" for c in own6)


def test_workload_names_resolve_to_both_families(lab):
    source = lab.state.workloads["h1-w1"]
    target = lab.state.workloads["h2-w1"]
    for family, flag in ((4, "-4"), (6, "-6")):
        if family not in lab.families:
            continue
        result = subprocess.run(["ip", "netns", "exec", source.netns, "ping", flag, "-c", "1",
                                 "-W", "2", "h2-w1.fabric.internal"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0 and address(target, family) in result.stdout, result
