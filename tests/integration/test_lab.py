"""`fabricctl lab` as a user runs it, and the inspection commands against it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.kernel import netns
from fabric.lab.topology import BASE_DIR, Lab
from fabric.processes import is_running
from tests.conftest import lab_name, needs_root
from tests.support.fabric import wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]


def ctl(*argv: str, expect: int | None = 0, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*FABRICCTL, *argv], capture_output=True, text=True,
                            timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, (argv, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def name():
    name = lab_name()
    Lab(name).down()
    yield name
    Lab(name).down()


def leftovers(name: str, pids: list[int]) -> list[str]:
    found = [f"netns {n}" for n in netns.names(f"{name}-")]
    found += [f"pid {p}" for p in pids if is_running(p)]
    for path in (BASE_DIR / name, *Path("/etc/netns").glob(f"{name}-*"),
                 Path("/var/run/frr") / f"{name}-peer"):
        if path.exists():
            found.append(str(path))
    return found


def test_lab_up_inspect_kill_down(name):
    up = json.loads(ctl("-o", "json", "lab", "up", "--name", name, "--hosts", "3").stdout)
    assert up["all_reachable"] is True
    assert len(up["matrix"]) == 6 and all(all(row.values()) for row in up["matrix"].values())
    # Dual stack by default: a session per other host and family.
    assert up["families"] == ["ipv4", "ipv6"]
    assert [h["sessions_up"] for h in up["hosts"]] == [4, 4, 4]

    again = ctl("--lab", name, "lab", "up", expect=2)
    assert f"a lab named {name} is already up" in again.stderr

    status = json.loads(ctl("-o", "json", "--lab", name, "--host", "h1", "node",
                            "status").stdout)
    assert {p["kind"] for p in status["peers"]} == {"mesh"}
    assert all(p["state"] == "Established" for p in status["peers"])
    table = ctl("--lab", name, "--host", "h1", "node", "status").stdout
    assert "Established" in table and "PEER ADDRESS" in table

    nodes = {n["name"]: n for n in json.loads(ctl("-o", "json", "--lab", name,
                                                  "nodes").stdout)}
    routes = json.loads(ctl("-o", "json", "--lab", name, "--host", "h1", "bgp",
                            "routes").stdout)
    learned = {r["prefix"]: r["next_hop"] for r in routes if r["best"]}
    for other in ("h2", "h3"):
        for block in nodes[other]["blocks"]:
            hop = nodes[other]["address6"] if ":" in block else nodes[other]["address"]
            assert learned[block] == hop
    advertised = json.loads(ctl("-o", "json", "--lab", name, "--host", "h1", "bgp", "routes",
                                "--advertised").stdout)
    assert {r["prefix"] for r in advertised} == set(nodes["h1"]["blocks"])
    kernel = json.loads(ctl("-o", "json", "--lab", name, "--host", "h1", "routes").stdout)
    kinds = {r["kind"] for r in kernel["routes"]}
    assert kinds == {"blackhole", "workload", "remote"}

    by_name = ctl("--lab", name, "lab", "exec", "h1-w1", "--", "ping", "-c", "1", "-W", "2",
                  "h3-w2.fabric.internal")
    assert "1 received" in by_name.stdout
    workloads = json.loads(ctl("-o", "json", "--lab", name, "workloads", "h3-w2").stdout)
    # The name resolves to both families; ping picks one of them.
    assert workloads[0]["node"] == "h3" and any(ip in by_name.stdout
                                                 for ip in workloads[0]["ips"])

    added = json.loads(ctl("-o", "json", "lab", "add-host", "--name", name, "--containers",
                           "1").stdout)
    assert added["host"] == "h4" and added["workloads"] == ["h4-w1"]
    bad = ctl("lab", "add-host", "H5/x", "--name", name, expect=2)
    assert bad.stderr.startswith("fabricctl: host name 'H5/x': use 1 to 13 lower-case")
    assert "H5/x" not in Lab(name).state.hosts
    wait_until(lambda: json.loads(ctl("-o", "json", "lab", "status", "--name", name,
                                      expect=None).stdout)["all_reachable"],
               "h4's workload reaches everyone (lab status)", 20)

    lab = Lab(name)
    pids = [p for h in lab.state.hosts.values() for p in (h.agent_pid, h.supervisor_pid) if p]
    pids.append(lab.state.etcd_pid)
    h3 = lab.state.hosts["h3"].address
    ctl("--lab", name, "lab", "kill", "h3")

    def h3_gone() -> bool:
        doc = json.loads(ctl("-o", "json", "--lab", name, "--host", "h1", "node", "status",
                             expect=None).stdout)
        session = [p for p in doc["peers"] if p["address"] == h3]
        return not session or session[0]["state"] != "Established"

    wait_until(h3_gone, "h1's session to h3 left Established", 15)
    wait_until(lambda: not [b for b in nodes["h3"]["blocks"] if b in {
        r["prefix"] for r in json.loads(ctl("-o", "json", "--lab", name, "--host", "h1",
                                            "routes").stdout)["routes"]}],
        "h3's routes are gone from h1", 15)

    assert ctl("lab", "down", "--name", name).returncode == 0
    assert leftovers(name, pids) == []
    assert "nothing" in ctl("lab", "down", "--name", name).stdout  # twice is fine


def test_lab_down_after_a_crash_half_way(name):
    lab = Lab(name)
    lab.create_underlay()
    lab.start_etcd()
    lab.add_host("h1", start=False)  # "crashed" before the agent started
    pids = [lab.state.etcd_pid]
    ctl("--lab", name, "lab", "down")
    assert leftovers(name, pids) == []


def test_inspection_commands_name_a_lab_that_is_not_up(name):
    result = ctl("--lab", name, "--host", "h1", "node", "status", expect=2)
    assert result.stderr.startswith("fabricctl: no lab named")
