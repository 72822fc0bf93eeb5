#!/usr/bin/env python3
"""A big fabric on one machine: N hosts, two route reflectors, two containers per host.

    python bench/scale.py [--hosts 25,50,100] [--samples 50] [--reference bird|none]

For each N, a lab is built with `fabricctl lab up --hosts N --route-reflectors 2
--containers-per-host 2 --check none --ip-family ipv4` (the command a user runs), and:

1. up: from the command's start until every BGP session is Established and every
   host's kernel has the block of every other host (the command waits for the
   sessions; the blocks are then checked in every kernel);
2. propagation: a new block claimed on one host (an allocation from a pool of /32
   blocks: each claims a block, as when a /26 fills up) until its route is in all N-1
   other kernels, timed by netlink events in every namespace: p50 and p99 of "in every
   kernel", and p50 of single kernels;
3. a dead host: its link goes down and its processes are killed (no goodbye); until
   its block is gone from every other kernel (bounded by the BGP hold time, 9 s);
4. at rest (after 20 s of quiet): RSS, PSS and USS per host (agent + ExaBGP), and the
   CPU of all of them together over 30 s, in cores;
5. `fabricctl lab down` of the whole lab.

Reference, same N, same machine, in the same run (`--reference bird`, the default): the
same lab with one BIRD route reflector instead of the two agent reflectors (`--peer
bird --peer-role rr`); propagation and the dead host are printed as ratios to it. Up
time, memory and idle CPU are compared with the issue's absolute goals (up < 180 s,
p99 < 1 s, RSS <= 60 MB per host, idle < 1 core at N = 100).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the packages it measures; its parent has bench.common.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field

from bench.common import RouteWatcher, cpu_seconds, memory_kb, pct, process_name
from fabric import logs
from fabric.kernel import netns
from fabric.lab.topology import Lab
from fabric.model.pools import parse_pool
from fabric.model.prefix import Prefix
from ipam.allocator import Ipam

FABRICCTL = str(Path(sys.executable).with_name("fabricctl"))
PROBE_POOL = "10.250.0.0/16"  # /32 blocks: every allocation claims a new block


@dataclass
class Result:
    hosts: int
    reflector: str
    up: float = 0.0
    steps: list[str] = field(default_factory=list)  # lab up's own per-step durations
    blocks_everywhere: float = 0.0
    to_all: list[float] = field(default_factory=list)
    to_one: list[float] = field(default_factory=list)
    dead: float = float("nan")
    rss_mb: float = 0.0
    pss_mb: float = 0.0
    uss_mb: float = 0.0
    by_process_mb: dict[str, float] = field(default_factory=dict)
    idle_cores: float = 0.0
    idle_by_process: dict[str, float] = field(default_factory=dict)
    etcd_idle_cores: float = 0.0
    down: float = 0.0


def fabricctl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FABRICCTL, *args], capture_output=True, text=True,
                          timeout=timeout)


def host_processes(lab: Lab) -> dict[str, list[int]]:
    """host -> pids of its agent and ExaBGP (and relay, where one runs)."""
    found: dict[str, list[int]] = {}
    for name, host in lab.state.hosts.items():
        found[name] = [pid for pid in netns.pids(host.netns)
                       if process_name(pid) in ("agent", "exabgp", "relay")]
    return found


def blocks(lab: Lab) -> dict[str, str]:
    store = lab.store()
    try:
        return {b.cidr: b.affinity for b in Ipam(store).blocks() if b.affinity}
    finally:
        store.close()


def kernel_prefixes(ns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", ns, "-4", "route", "show", "proto", "73"],
                         capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line and "/" in line.split()[0]}


def wait_blocks_everywhere(lab: Lab, timeout: float = 300) -> None:
    """Every host's kernel has every other host's blocks (its own is a blackhole)."""
    owners = blocks(lab)
    pending = dict(lab.state.hosts)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, host in list(pending.items()):
            wanted = {cidr for cidr, owner in owners.items() if owner != name}
            if wanted <= kernel_prefixes(host.netns):
                del pending[name]
        if pending:
            time.sleep(0.5)
    if pending:
        raise SystemExit(f"blocks missing after {timeout:.0f}s on {sorted(pending)[:5]}")


def at_rest(lab: Lab, result: Result, settle: float, window: float) -> None:
    time.sleep(settle)
    per_host = host_processes(lab)
    pids = [pid for pids in per_host.values() for pid in pids]
    names = {pid: process_name(pid) for pid in pids}
    etcd = [m.pid for m in lab.state.etcd_members if m.pid] or \
        [pid for pid in [lab.state.etcd_pid] if pid]
    before = {pid: cpu_seconds(pid) for pid in pids + etcd}
    time.sleep(window)
    after = {pid: cpu_seconds(pid) for pid in pids + etcd}
    spent = {pid: after[pid] - before[pid] for pid in before}
    result.idle_cores = sum(spent[pid] for pid in pids) / window
    for pid in pids:
        result.idle_by_process[names[pid]] = result.idle_by_process.get(names[pid], 0.0) + \
            spent[pid] / window
    result.etcd_idle_cores = sum(spent[pid] for pid in etcd) / window
    memory = {pid: memory_kb(pid) for pid in pids}
    count = len(per_host)
    result.rss_mb = sum(m["rss"] for m in memory.values()) / 1024 / count
    result.pss_mb = sum(m["pss"] for m in memory.values()) / 1024 / count
    result.uss_mb = sum(m["uss"] for m in memory.values()) / 1024 / count
    for pid, m in memory.items():
        result.by_process_mb[names[pid]] = result.by_process_mb.get(names[pid], 0.0) + \
            m["rss"] / 1024 / count


def propagation(lab: Lab, result: Result, samples: int) -> None:
    store = lab.store()
    try:
        ipam = Ipam(store)
        ipam.add_pool(parse_pool("scale-probe", PROBE_POOL, 32))
        names = sorted(lab.state.hosts, key=lambda n: int(n[1:]))
        spaces = {name: lab.state.hosts[name].netns for name in names}
        watcher = RouteWatcher(list(spaces.values()))
        try:
            for sample in range(samples):
                origin = names[sample % len(names)]
                others = [spaces[n] for n in names if n != origin]
                started = time.monotonic()
                record = ipam.allocate(f"scale-probe-{sample}.eth0", origin,
                                       pools=("scale-probe",))
                prefix = Prefix.parse(record.allocations[0].host_prefix)
                arrived = watcher.wait(prefix, others, timeout=30)
                if arrived is None:
                    missing = [ns for ns in others if ns not in watcher.added.get(prefix, {})]
                    raise SystemExit(f"{prefix} from {origin} missing after 30 s in "
                                     f"{len(missing)} kernels, e.g. {missing[:3]}")
                times = sorted(t - started for t in arrived.values())
                result.to_all.append(times[-1])
                result.to_one.append(statistics.median(times))
                time.sleep(0.2)
        finally:
            watcher.close()
    finally:
        store.close()


def dead_host(lab: Lab, result: Result) -> None:
    names = sorted(lab.state.hosts, key=lambda n: int(n[1:]))
    victim = names[-1]  # never a reflector: those are h1 and h2
    block = Prefix.parse(next(c for c, o in blocks(lab).items() if o == victim))
    others = [lab.state.hosts[n].netns for n in names if n != victim]
    watcher = RouteWatcher(others)
    try:
        started = time.monotonic()
        lab.kill_host(victim)
        gone = watcher.wait(block, others, deleted=True, timeout=90)
        result.dead = max(gone.values()) - started if gone else float("nan")
    finally:
        watcher.close()


def run(hosts: int, reflector: str, samples: int, settle: float, window: float,
        parallel: int) -> Result:
    name = f"bsc{hosts}{reflector[0]}"  # lab names: at most 10 characters
    result = Result(hosts, reflector)
    fabricctl("lab", "down", "--name", name)
    args = ["lab", "up", "--name", name, "--hosts", str(hosts), "--containers-per-host",
            "2", "--check", "none", "--ip-family", "ipv4", "--parallel", str(parallel)]
    args += ["--route-reflectors", "2"] if reflector == "agents" else \
        ["--peer", "bird", "--peer-role", "rr"]
    started = time.monotonic()
    up = fabricctl(*args)
    result.up = time.monotonic() - started
    try:
        if up.returncode != 0:
            raise SystemExit(f"lab up failed:\n{up.stderr[-3000:]}")
        result.steps = [line.split("] ", 1)[1] for line in up.stderr.splitlines()
                        if line.startswith("[") and "] " in line]
        lab = Lab(name)
        wait_blocks_everywhere(lab)
        result.blocks_everywhere = time.monotonic() - started
        print(f"  N={hosts} ({reflector} reflecting): up {result.up:.0f}s, blocks in every "
              f"kernel {result.blocks_everywhere:.0f}s", flush=True)
        if reflector == "agents":
            at_rest(lab, result, settle, window)
        propagation(lab, result, samples)
        dead_host(lab, result)
    finally:
        started = time.monotonic()
        fabricctl("lab", "down", "--name", name)
        result.down = time.monotonic() - started
    return result


def report(ours: Result, reference: Result | None) -> None:
    n = ours.hosts
    print(f"N = {n} hosts, 2 agent route reflectors, 2 containers per host (IPv4)")
    print(f"  up: `lab up` {ours.up:.0f}s, every block in every kernel at "
          f"{ours.blocks_everywhere:.0f}s (goal at N=100: < 180 s)")
    for step in ours.steps:
        print(f"    {step}")
    p50, p99 = statistics.median(ours.to_all), pct(ours.to_all, 0.99)
    line = (f"  new block until in all {n - 1} other kernels ({len(ours.to_all)} samples): "
            f"p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms (goal p99 < 1000 ms); "
            f"single kernel p50 {1000 * statistics.median(ours.to_one):.0f} ms")
    if reference and reference.to_all:
        ref50, ref99 = statistics.median(reference.to_all), pct(reference.to_all, 0.99)
        line += (f"\n    reference, one BIRD reflector: p50 {1000 * ref50:.0f} ms, p99 "
                 f"{1000 * ref99:.0f} ms; ratio p50 {p50 / ref50:.2f}, p99 {p99 / ref99:.2f}")
    print(line)
    line = f"  dead host until its block is gone from all others: {ours.dead:.1f}s " \
        "(hold time 9 s)"
    if reference:
        line += f"; one BIRD reflector {reference.dead:.1f}s, ratio " \
            f"{ours.dead / reference.dead:.2f}"
    print(line)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ours.by_process_mb.items()))
    print(f"  memory per host (agent + ExaBGP): RSS {ours.rss_mb:.1f} MB ({parts}; goal "
          f"<= 60), PSS {ours.pss_mb:.1f} MB, USS {ours.uss_mb:.1f} MB")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ours.idle_by_process.items()))
    print(f"  at rest: {ours.idle_cores:.2f} cores for all {n} hosts ({parts}; goal < 1), "
          f"{100 * ours.idle_cores / n:.2f}% of a core per host; etcd "
          f"{ours.etcd_idle_cores:.3f} cores")
    print(f"  lab down: {ours.down:.1f}s (goal at N=100: < 20 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="25,50,100", help="comma-separated sizes")
    parser.add_argument("--samples", type=int, default=50, help="new blocks per size")
    parser.add_argument("--reference", choices=("bird", "none"), default="bird")
    parser.add_argument("--settle", type=float, default=20.0, help="quiet before measuring")
    parser.add_argument("--window", type=float, default=30.0, help="idle CPU window")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logs.configure("console", "warning")
    results = []
    for hosts in (int(h) for h in args.hosts.split(",")):
        ours = run(hosts, "agents", args.samples, args.settle, args.window, args.parallel)
        reference = run(hosts, "bird", args.samples, 0, 0, args.parallel) \
            if args.reference == "bird" else None
        report(ours, reference)
        results.append({"ours": ours.__dict__, "reference": reference and reference.__dict__})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
