"""The lab's state file under concurrent writers, and the supervisor's decisions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from fabric.cli.lab import agent_state
from fabric.lab.topology import (
    HostState,
    Lab,
    LabState,
    exit_reason,
    restart_delay,
    restarts_after,
    still_ours,
)

WRITER = """
import sys
from pathlib import Path
from fabric.lab.topology import Lab

lab = Lab(sys.argv[1], Path(sys.argv[2]))
for _ in range(int(sys.argv[4])):
    with lab.locked() as state:
        state.hosts[sys.argv[3]].restarts += 1
"""


def host(name: str = "h1", **fields: object) -> HostState:
    return HostState(name, f"x-{name}", "10.99.0.11", f"/nowhere/{name}", **fields)  # type: ignore[arg-type]


def test_concurrent_read_modify_writes_lose_nothing(tmp_path):
    """Four processes, two per host, each changing the file 100 times."""
    lab = Lab("cli1", tmp_path)
    with lab.locked() as state:
        state.hosts = {"h1": host("h1"), "h2": host("h2")}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, "cli1", str(tmp_path), name,
                                 "100"]) for name in ("h1", "h2", "h1", "h2")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    hosts = lab.refresh().hosts
    assert (hosts["h1"].restarts, hosts["h2"].restarts) == (200, 200)


def test_the_lock_is_reentrant_and_writes_once_at_the_end(tmp_path):
    lab = Lab("cli2", tmp_path)
    with lab.locked() as outer:
        outer.hosts["h1"] = host()
        with lab.locked() as inner:
            assert inner is outer
            inner.hosts["h1"].restarts = 3
        assert not lab.state_path.exists()
    assert json.loads(lab.state_path.read_text())["hosts"]["h1"]["restarts"] == 3


def test_a_failed_change_still_records_what_was_made(tmp_path):
    lab = Lab("cli3", tmp_path)
    with pytest.raises(RuntimeError), lab.locked() as state:
        state.etcd_pid = 1234
        raise RuntimeError("the next step failed")
    assert Lab("cli3", tmp_path).state.etcd_pid == 1234


def test_a_state_file_with_unknown_fields_still_loads():
    doc = {"name": "cli4", "future": 1, "hosts": {"h1": {**host().__dict__, "new": True}}}
    assert LabState.from_dict(doc).hosts["h1"] == host()


@pytest.mark.parametrize("returncode, restart, words", [
    (0, False, "exit status 0"),
    (1, True, "exit status 1"),
    (-signal.SIGKILL, True, "killed by SIGKILL"),
    (-signal.SIGSEGV, True, "killed by SIGSEGV"),
    (-signal.SIGTERM, False, "killed by SIGTERM"),
    (-signal.SIGINT, False, "killed by SIGINT"),
])
def test_restart_on_failure_as_systemd(returncode, restart, words):
    assert restarts_after(returncode) is restart
    assert exit_reason(returncode) == words


def test_the_back_off_doubles_up_to_a_ceiling():
    assert [restart_delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize("fields, answering, running, state", [
    ({}, True, set(), "running"),
    ({"alive": False, "agent_pid": 10}, False, {10}, "killed"),
    ({"agent_pid": 10, "supervisor_pid": 11}, False, {10, 11}, "not answering"),
    ({"agent_pid": None, "supervisor_pid": 11}, False, {11}, "restarting"),
    ({"last_exit": "exit status 0"}, False, set(), "exited (exit status 0)"),
    ({"agent_pid": 10}, False, set(), "exited"),  # its supervisor was killed, then it died
    ({"wanted": False, "last_exit": "killed by SIGKILL"}, False, set(), "stopped"),
])
def test_agent_state_in_lab_status(fields, answering, running, state):
    assert agent_state(host(**fields), answering, running=lambda pid: pid in running) == state


def test_a_recorded_pid_is_signalled_only_while_it_runs_what_we_recorded():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # Between fork and exec the child still shows our own command line: wait for exec.
        for _ in range(200):
            if still_ours(sleeper.pid, "sleep"):
                break
            time.sleep(0.01)
        assert still_ours(sleeper.pid, "sleep")
        assert not still_ours(sleeper.pid, "fabric-agent")  # as if the PID were reused
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not still_ours(sleeper.pid, "sleep")
    assert not still_ours(None, "sleep")


def test_a_host_built_out_of_order_gets_the_address_its_name_promises(tmp_path):
    from fabric.lab.topology import LabError

    lab = Lab("addr", tmp_path)
    state = lab.state
    assert lab._host_index("h7", state) == 17  # h7 first (parallel build): still .17
    assert lab._host_index("h1", state) == 11
    state.hosts["other"] = host("other")  # host() gives .11
    assert lab._host_index("h1", state) == 12  # .11 taken: the first free one
    assert lab._host_index("db", state) == 12  # no number in the name: the first free
    for index in range(12, 241):
        state.hosts[f"x{index}"] = host(f"x{index}")
        state.hosts[f"x{index}"].address = lab._address(index)
    with pytest.raises(LabError, match="no underlay address left for host late"):
        lab._host_index("late", state)


def test_a_sampled_reachability_table_shows_what_was_not_pinged_and_says_it_sampled():
    """Pairs the sample did not ping were shown as FAIL under 'all workloads reach each
    other'."""
    from fabric.cli.lab import _cell, _verdict
    sampled = {"ipv4": {"a": {"b": True}, "b": {"c": True}, "c": {"a": True}}}
    assert [_cell(sampled["ipv4"]["a"], "a", t) for t in "abc"] == ["-", "ok", "."]
    assert _verdict(sampled, True).startswith("all 3 sampled pairs of 6 reach each other")
    full = {"ipv4": {"a": {"b": True}, "b": {"a": True}}}
    assert _verdict(full, True) == "all workloads reach each other"
    failed = {"ipv4": {"a": {"b": False}, "b": {"a": True}}}
    assert _verdict(failed, True) == "SOME PINGS FAILED" and _cell(failed["ipv4"]["a"], "a",
                                                                   "b") == "FAIL"
    assert _verdict({}, True) == "reachability not checked (--check none)"
    assert _verdict({}, False) == "reachability not checked (no workloads)"


def test_neighbour_thresholds_that_cannot_be_seen_refuse_a_big_lab(tmp_path, monkeypatch):
    """Outside the initial network namespace the thresholds do not exist: a big lab
    must not be said to be sized (it once printed 'ok' and changed nothing)."""
    import pytest

    from fabric.lab import topology
    monkeypatch.setattr(topology, "NEIGH",
                        str(tmp_path) + "/ipv{family}/neigh/default/gc_thresh{level}")
    (tmp_path / "ipv4" / "neigh" / "default").mkdir(parents=True)  # no gc_thresh files
    with pytest.raises(topology.LabError, match=r"sysctl -w net\.ipv4\.neigh\.default"):
        topology.size_neighbour_tables(100, 2, (4, 6))  # no ipv6 folder: IPv6 is off
    assert topology.size_neighbour_tables(5, 1, (4, 6)) == []  # the defaults hold 5 hosts
    for level, value in ((1, 128), (2, 512), (3, 1024)):
        (tmp_path / "ipv4" / "neigh" / "default" / f"gc_thresh{level}").write_text(str(value))
    assert len(topology.size_neighbour_tables(100, 2, (4,))) == 3
    assert int((tmp_path / "ipv4/neigh/default/gc_thresh3").read_text()) > 20000
