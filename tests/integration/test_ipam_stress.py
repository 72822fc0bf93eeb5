"""3 hosts x 8 worker processes allocating and releasing against real etcd, some of
them killed with SIGKILL mid-way. No address is ever held by two handles; check finds
exactly the leaks of the killed workers; release frees them; the pool ends empty."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fabric.model.nodes import Node
from fabric.model.pools import parse_pool
from fabric.store.registry import Registry
from ipam.allocator import Ipam
from ipam.check import check

HOSTS = ("host-a", "host-b", "host-c")
WORKERS = 8
ROOT = Path(__file__).resolve().parents[2]


def parse_journal(path: Path) -> dict[str, list[str]]:
    steps: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            steps.setdefault(parts[1], []).append(parts[0])
    return steps


def held_unregistered(marks: list[str]) -> tuple[bool, bool]:
    """(may, must) this handle still hold an address with no workload registered."""
    if "A+" not in marks or "X" in marks or "R=" in marks:
        return False, False
    may = "W=" not in marks or "D+" in marks
    must = ("A=" in marks and "W+" not in marks) or ("D=" in marks and "R+" not in marks)
    return may, must


def held(marks: list[str]) -> tuple[bool, bool]:
    """(may, must) this handle still hold an address."""
    if "A+" not in marks or "X" in marks:
        return False, False
    return "R=" not in marks, "A=" in marks and "R+" not in marks


def bounds(steps: dict[str, list[str]], judge) -> tuple[set[str], set[str]]:
    may = {h for h, marks in steps.items() if judge(marks)[0]}
    must = {h for h, marks in steps.items() if judge(marks)[1]}
    return may, must


@pytest.mark.slow
def test_concurrent_workers_with_kills(store, etcd_server, tmp_path):
    ipam = Ipam(store)
    # 128 addresses in /28 blocks for up to 120 held: hosts claim every block and
    # borrow from each other, so all the allocator's paths race.
    ipam.add_pool(parse_pool("stress", "10.50.0.0/25", 28))
    registry = Registry(store)
    for index, host in enumerate(HOSTS):
        store.put(f"/l3fabric/v1/nodes/{host}",
                  Node(host, f"192.0.2.{index + 1}", 64512).to_record())
    procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
    journals: dict[tuple[str, int], Path] = {}
    for host in HOSTS:
        for worker in range(WORKERS):
            journal = tmp_path / f"{host}-{worker}.log"
            journals[host, worker] = journal
            procs[host, worker] = subprocess.Popen(
                [sys.executable, "-m", "tests.support.ipam_worker", etcd_server.endpoint,
                 host, str(worker), str(journal), str(random.randrange(1 << 30))],
                cwd=ROOT)
    duplicates_seen: list[object] = []
    stop_watch = threading.Event()

    def watch_for_duplicates() -> None:
        while not stop_watch.is_set():
            report = check(ipam.snapshot())
            if report.of("duplicate"):
                duplicates_seen.extend(report.of("duplicate"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_for_duplicates, daemon=True)
    try:
        deadline = time.monotonic() + 20
        while not all(j.exists() and "ready" in j.read_text() for j in journals.values()):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        watcher.start()
        time.sleep(2.0)
        killed = [(host, w) for host in HOSTS for w in random.sample(range(WORKERS), 2)]
        for key in killed:
            time.sleep(random.uniform(0.05, 0.3))
            os.kill(procs[key].pid, signal.SIGKILL)
        time.sleep(1.0)
        for key, proc in procs.items():
            if key not in killed:
                os.kill(proc.pid, signal.SIGTERM)
        for key, proc in procs.items():
            proc.wait(timeout=30)
            if key not in killed:
                assert proc.returncode == 0, f"worker {key} failed"
    finally:
        stop_watch.set()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    watcher.join(timeout=5)
    assert not duplicates_seen, duplicates_seen

    steps = {key: parse_journal(path) for key, path in journals.items()}
    allocations = sum(marks.count("A=") for s in steps.values() for marks in s.values())
    assert allocations > 200, "too little work to prove anything"
    killed_steps = {h: m for key in killed for h, m in steps[key].items()}

    # Phase 1: leaks are the killed workers' allocations that never got registered
    # (or were deregistered but not released).
    report = check(ipam.snapshot())
    assert not (report.of("duplicate") + report.of("dangling") + report.of("orphan-ip")
                + report.of("orphan-block") + report.of("corrupt")), report.findings
    leaked = {f.subject for f in report.of("leak")}
    may, must = bounds(killed_steps, held_unregistered)
    assert must <= leaked <= may

    # Phase 2: the killed workers' containers are dead; their registrations go (as CNI
    # GC would remove them). Now every address they held is a leak, and nothing else.
    for key in killed:
        for workload in registry.workloads(key[0]):
            if workload.handle in killed_steps:
                registry.deregister_workload(workload.node, workload.handle)
    report = check(ipam.snapshot())
    leaked = {f.subject for f in report.of("leak")}
    may, must = bounds(killed_steps, held)
    assert leaked, "the kills left nothing behind; the test proved nothing"
    assert must <= leaked <= may
    assert report.counts["addresses_used"] == len(leaked)

    # Phase 3: release frees them and the pool ends empty.
    ipam.release_found(report)
    final = check(ipam.snapshot())
    assert final.ok, final.findings
    assert final.counts["addresses_used"] == 0 and final.counts["handles"] == 0
