"""The lab's agents as systemd would keep them: a crashed agent comes back, one stopped
on purpose stays stopped, and concurrent fabricctl processes keep every PID.

Runs `fabricctl` as a user would, against a two-host lab. The tests share the lab and
run in order; the last ones kill a host and take the lab down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.kernel import netns
from fabric.lab.topology import Lab
from fabric.processes import is_running
from tests.conftest import needs_root
from tests.support.fabric import wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]
NAME = f"cli{os.getpid() % 100000:05d}s"


def ctl(*argv: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*FABRICCTL, *argv], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    if expect is not None:
        assert result.returncode == expect, (argv, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    Lab(NAME).down()
    try:
        ctl("lab", "up", "--name", NAME, "--hosts", "2", "--containers-per-host", "0")
        yield Lab(NAME)
    finally:
        Lab(NAME).down()


def commandline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def agents(lab: Lab, host: str) -> list[int]:
    """fabric-agent processes in the host's namespace."""
    return sorted(p for p in netns.pids(lab.state.hosts[host].netns)
                  if is_running(p) and any(w.endswith("fabric-agent") for w in commandline(p)))


def supervisors(host: str) -> list[int]:
    """Supervisor processes of one of this lab's hosts, wherever they run."""
    wanted = ["-m", "fabric.lab.topology", "supervise", NAME, host]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_running(int(entry.name)):
            words = commandline(int(entry.name))
            if words[1:6] == wanted:
                found.append(int(entry.name))
    return sorted(found)


def hosts(lab: Lab) -> dict[str, dict]:
    doc = json.loads(ctl("-o", "json", "lab", "status", "--name", lab.name,
                         expect=None).stdout)
    return {h["host"]: h for h in doc["hosts"]}


def one_agent_each(lab: Lab, names: tuple[str, ...] = ("h1", "h2")) -> None:
    """State and processes agree: one supervisor and one agent per host, as recorded."""
    state = lab.refresh()
    for name in names:
        host = state.hosts[name]
        assert agents(lab, name) == [host.agent_pid], name
        assert supervisors(name) == [host.supervisor_pid], name


def test_the_lab_starts_agents_under_supervision(lab):
    one_agent_each(lab)
    assert {h["agent_state"] for h in hosts(lab).values()} == {"running"}


def test_two_restart_agent_at_once_keep_both_pids(lab):
    for _ in range(3):
        runs = [subprocess.Popen([*FABRICCTL, "lab", "restart-agent", host, "--name", NAME,
                                  *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
                for host, flags in (("h1", []), ("h2", ["--kill"]))]
        for run in runs:
            out, err = run.communicate(timeout=120)
            assert (run.returncode, "Traceback" in err) == (0, False), (out, err)
        one_agent_each(lab)


def test_an_agent_killed_with_sigkill_comes_back(lab):
    before = lab.refresh().hosts["h1"]
    os.kill(before.agent_pid, signal.SIGKILL)
    back = wait_until(lambda: (h := hosts(lab)["h1"])["agent"] and
                      h["agent_pid"] != before.agent_pid and h, "h1's agent is back", 30)
    assert back["restarts"] == before.restarts + 1
    assert back["last_exit"] == "killed by SIGKILL"
    assert back["supervisor_pid"] == before.supervisor_pid
    wait_until(lambda: ctl("--lab", NAME, "--host", "h1", "node", "status",
                           expect=None).returncode == 0, "h1's session is up again", 30)
    one_agent_each(lab)


def test_an_agent_stopped_cleanly_from_outside_is_left_stopped(lab):
    """Restart=on-failure: SIGTERM is a clean stop, whoever sent it."""
    before = lab.refresh().hosts["h1"]
    os.kill(before.agent_pid, signal.SIGTERM)
    wait_until(lambda: lab.refresh().hosts["h1"].supervisor_pid is None,
               "h1's supervisor saw a clean exit and ended", 30)
    # It records that, then exits: give it the moment between the two.
    wait_until(lambda: not is_running(before.supervisor_pid), "the supervisor exited", 10)
    assert agents(lab, "h1") == []
    h1 = hosts(lab)["h1"]
    assert h1["agent_state"] == f"exited ({h1['last_exit']})"
    assert h1["restarts"] == before.restarts
    ctl("lab", "restart-agent", "h1", "--name", NAME)
    one_agent_each(lab)


def test_restart_agent_with_kill_is_not_undone(lab):
    before = lab.refresh().hosts["h1"]
    out = ctl("lab", "restart-agent", "h1", "--kill", "--name", NAME).stdout
    assert f"killed (-9) (pid {before.agent_pid})" in out
    after = lab.refresh().hosts["h1"]
    assert not is_running(before.supervisor_pid)
    assert after.restarts == before.restarts  # on purpose: not counted as a crash
    one_agent_each(lab)


def test_a_stopped_agent_stays_stopped_until_restarted(lab):
    lab.stop_agent("h2")
    assert (agents(lab, "h2"), supervisors("h2")) == ([], [])
    assert hosts(lab)["h2"]["agent_state"] == "stopped"
    assert "restart-agent HOST starts it" in ctl("lab", "status", "--name", NAME,
                                                 expect=None).stdout
    ctl("lab", "restart-agent", "h2", "--name", NAME)
    one_agent_each(lab)


def test_a_killed_host_stays_dead(lab):
    ctl("lab", "kill", "h2", "--name", NAME)
    assert (agents(lab, "h2"), supervisors("h2")) == ([], [])
    assert hosts(lab)["h2"]["agent_state"] == "killed"
    one_agent_each(lab, ("h1",))


def test_down_stops_the_supervisors(lab):
    state = lab.refresh()
    pids = [p for h in state.hosts.values() for p in (h.agent_pid, h.supervisor_pid) if p]
    assert pids
    ctl("lab", "down", "--name", NAME)
    assert [p for p in pids if is_running(p)] == []
    assert supervisors("h1") + supervisors("h2") == []
    assert netns.names(f"{NAME}-") == []
