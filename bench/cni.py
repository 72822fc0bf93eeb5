#!/usr/bin/env python3
"""CNI ADD/DEL latency: l3fabric's plugin against the reference ptp + host-local.

    python bench/cni.py [--runs N] [--rounds R] [--concurrent C] [--profile DIR]

Builds a one-host lab (etcd, fabric-agent), then execs each plugin the same way a
runtime does (fresh network namespace per ADD, config on stdin, CNI_* environment,
inside the host's namespace through nsenter). Two cases, each alternating between
ours and the reference in rounds so that machine noise hits both alike:

  sequential  ADD then DEL of one container at a time (rounds of 10);
  concurrent  C ADDs (fresh namespaces) started at once, then their C DELs at once;
  agent only  the same C ADDs and DELs sent straight to the agent's socket, as the
              shim sends them, without exec'ing anything: the agent's own share.

Printed: p50/p99 of ADD and DEL per case and side, the spread of the per-round p50s,
the ratios to the reference, the CPU seconds each side spent (the plugin processes,
and for ours also the agent's and etcd's own CPU) and the agent's peak RSS. Also
printed: the cost of `nsenter /bin/true`, which both sides pay. With --profile, the
agent is sampled by py-spy during the concurrent rounds (a flame graph per round).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the `cni` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.common

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import cpu_seconds, memory_kb, pct
from cni import invoke
from cni.install import conflist
from cni.shim import DEFAULT_SOCKET, FIELDS, encode_request, socket_address
from fabric import logs
from fabric.kernel import netns
from fabric.kernel.netns import entered
from fabric.lab.topology import Lab

REF_DIR = "/usr/lib/cni"
LAB = "benchcni"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Side:
    """What one plugin's runs gathered: latencies per verb and case, CPU seconds."""

    name: str
    binary: str
    config: dict[str, Any]
    prefix: str
    lat: dict[str, list[float]] = field(default_factory=dict)
    round_p50: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # case -> plugin processes' CPU
    agent_cpu: dict[str, float] = field(default_factory=dict)
    etcd_cpu: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def add(self, case: str, verb: str, values: list[float]) -> None:
        self.lat.setdefault(f"{case} {verb}", []).extend(values)
        self.round_p50.setdefault(f"{case} {verb}", []).append(statistics.median(values))


def run_plugin(side: Side, command: str, name: str, host_ns: str) -> float:
    started = time.perf_counter()
    outcome = invoke.run(side.binary, command, side.config, container_id=name,
                         netns=netns.path(name), host_netns=host_ns,
                         cni_path=f"{Path(side.binary).parent}:{REF_DIR}")
    elapsed = time.perf_counter() - started
    if not outcome.ok:
        raise SystemExit(f"{side.name} {command} {name} failed: {outcome.stdout} "
                         f"{outcome.stderr}")
    return elapsed


class Meter:
    """CPU of the plugin processes (our children), the agent and etcd over a phase."""

    def __init__(self, agent_pid: int, etcd_pid: int) -> None:
        self.pids = (agent_pid, etcd_pid)

    def __enter__(self) -> Meter:
        self.start = (children_cpu(), *(cpu_seconds(p) for p in self.pids))
        return self

    def __exit__(self, *_: object) -> None:
        end = (children_cpu(), *(cpu_seconds(p) for p in self.pids))
        self.plugins, self.agent, self.etcd = (b - a for a, b in zip(self.start, end,
                                                                      strict=True))

    def charge(self, side: Side, case: str, ours: bool, ops: int) -> None:
        side.cpu[case] = side.cpu.get(case, 0.0) + self.plugins
        side.count[case] = side.count.get(case, 0) + ops
        if ours:
            side.agent_cpu[case] = side.agent_cpu.get(case, 0.0) + self.agent
            side.etcd_cpu[case] = side.etcd_cpu.get(case, 0.0) + self.etcd


def sequential(side: Side, host_ns: str, runs: int, meter: Meter, ours: bool,
               record: bool = True,
               profile: Callable[[], Callable[[], None]] | None = None) -> None:
    adds, dels = [], []
    names = [f"{side.prefix}s{i}" for i in range(runs)]
    stop_profile = None
    try:
        for name in names:  # made outside the meter: `ip netns add` is not plugin CPU
            netns.create(name)
        stop_profile = profile() if profile else None
        with meter:
            for name in names:
                adds.append(run_plugin(side, "ADD", name, host_ns))
                dels.append(run_plugin(side, "DEL", name, host_ns))
    finally:
        if stop_profile:
            stop_profile()
        for name in names:
            netns.remove(name)
    if record:
        meter.charge(side, "sequential", ours, runs)
        side.add("sequential", "ADD", adds)
        side.add("sequential", "DEL", dels)


def at_once(count: int, work: Callable[[int], float]) -> list[float]:
    """Run work(0..count-1) on `count` threads released together; their latencies."""
    barrier = threading.Barrier(count)
    results: list[float | BaseException] = [0.0] * count

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # SystemExit from run_plugin included
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise SystemExit(f"{len(failed)} of {count} failed: {failed[0]}")
    return [r for r in results if isinstance(r, float)]


def concurrent(side: Side, host_ns: str, count: int, meter: Meter, ours: bool,
               profile: Callable[[], Callable[[], None]] | None = None) -> None:
    names = [f"{side.prefix}c{i}" for i in range(count)]
    stop_profile = None
    try:
        for name in names:
            netns.create(name)
        stop_profile = profile() if profile else None
        with meter:
            adds = at_once(count, lambda i: run_plugin(side, "ADD", names[i], host_ns))
            dels = at_once(count, lambda i: run_plugin(side, "DEL", names[i], host_ns))
    finally:
        if stop_profile:
            stop_profile()
        for name in names:
            netns.remove(name)
    meter.charge(side, "concurrent", ours, count)
    side.add("concurrent", "ADD", adds)
    side.add("concurrent", "DEL", dels)


def direct(side: Side, host_ns: str, command: str, name: str) -> float:
    """One request straight to the agent's socket, as the shim sends it (no exec)."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": name, "CNI_NETNS": netns.path(name),
           "CNI_IFNAME": "eth0", "CNI_ARGS": "", "CNI_PATH": ""}
    payload = encode_request([b"l3fabric"] + [env[k].encode() for k in FIELDS[1:-1]]
                             + [json.dumps(side.config).encode()])
    fd = os.open(netns.path(name), os.O_RDONLY)
    started = time.perf_counter()
    try:
        with entered(host_ns):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            sock.connect(socket_address(DEFAULT_SOCKET))
            sent = sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             fd.to_bytes(4, sys.byteorder))])
            sock.sendall(payload[sent:])
            sock.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    if not reply.startswith(b"0\n"):
        raise SystemExit(f"{command} {name} failed: {reply[:300]!r}")
    return elapsed


def agent_only(side: Side, host_ns: str, count: int) -> None:
    """`count` ADDs, then DELs, at once on the agent's socket: the agent's own share."""
    names = [f"{side.prefix}d{i}" for i in range(count)]
    try:
        for name in names:
            netns.create(name)
        adds = at_once(count, lambda i: direct(side, host_ns, "ADD", names[i]))
        dels = at_once(count, lambda i: direct(side, host_ns, "DEL", names[i]))
    finally:
        for name in names:
            netns.remove(name)
    side.add("agent only", "ADD", adds)
    side.add("agent only", "DEL", dels)


def row(name: str, values: list[float], rounds: list[float] | None = None
        ) -> tuple[float, float]:
    p50, p99 = 1000 * statistics.median(values), 1000 * pct(values, 0.99)
    spread = ""
    if rounds and len(rounds) > 1:
        spread = f"   round p50s {1000 * min(rounds):.1f}-{1000 * max(rounds):.1f} ms"
    print(f"{name:<40} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   (n={len(values)}){spread}")
    return p50, p99


def py_spy(pid: int, out_dir: Path, tag: str) -> Callable[[], Callable[[], None]]:
    """A starter for one py-spy recording of `pid` per call; the starter returns a stop."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    counter = iter(range(1000))

    def start() -> Callable[[], None]:
        out = out_dir / f"{tag}-{next(counter)}.txt"
        proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "500",
                                 "--format", "raw", "--threads", "--idle", "--nonblocking",
                                 "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach

        def stop() -> None:
            proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        return stop

    return start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="sequential ADD/DELs per side")
    parser.add_argument("--rounds", type=int, default=5, help="concurrent rounds per side")
    parser.add_argument("--concurrent", type=int, default=20, help="ADDs started at once")
    parser.add_argument("--profile", type=Path, help="py-spy the agent into this folder")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["sequential", "concurrent"])
    args = parser.parse_args()
    logs.configure("console", "warning")
    if not Path(REF_DIR, "ptp").exists():
        raise SystemExit("the reference plugins are missing: apt-get install "
                         "containernetworking-plugins")
    lab = Lab(LAB)
    lab.down()
    data_dir = tempfile.mkdtemp(prefix="benchcni-host-local-")
    try:
        lab.create_underlay()
        lab.start_etcd()
        lab.add_pool("bench", "10.244.0.0/16")
        lab.add_host("h1")
        lab.wait_agent("h1")
        lab.install_cni()
        host = lab.refresh().hosts["h1"]
        host_ns = netns.path(host.netns)
        agent_pid, etcd_pid = host.agent_pid, lab.state.etcd_pid
        assert agent_pid and etcd_pid
        meter = Meter(agent_pid, etcd_pid)
        ours = Side("l3fabric", str(lab.cni_bin / "l3fabric"),
                    invoke.network_config(conflist("benchnet")), "bencho")
        ref = Side("ptp+host-local", f"{REF_DIR}/ptp",
                   {"cniVersion": "1.0.0", "name": "refnet", "type": "ptp",
                    "ipam": {"type": "host-local", "subnet": "10.250.0.0/16",
                             "dataDir": data_dir}}, "benchr")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        profile = py_spy(agent_pid, args.profile, "concurrent") if args.profile else None
        seq_profile = py_spy(agent_pid, args.profile, "sequential") if args.profile else None
        # Warm both paths (page cache, the agent's first etcd round trips).
        sequential(ours, host_ns, 5, meter, True, record=False)
        sequential(ref, host_ns, 5, meter, False, record=False)
        if "concurrent" not in args.skip:
            for _ in range(args.rounds):
                concurrent(ours, host_ns, args.concurrent, meter, True, profile)
                concurrent(ref, host_ns, args.concurrent, meter, False)
                agent_only(ours, host_ns, args.concurrent)
        if "sequential" not in args.skip:
            for _ in range(max(1, args.runs // 10)):
                sequential(ours, host_ns, 10, meter, True, profile=seq_profile)
                sequential(ref, host_ns, 10, meter, False)
        overhead = []
        for _ in range(20):
            t0 = time.perf_counter()
            subprocess.run(["nsenter", f"--net={host_ns}", "/bin/true"], check=True)
            overhead.append(time.perf_counter() - t0)
        print()
        row("nsenter /bin/true (both pay it)", overhead)
        ratios = []
        goals = {"sequential ADD": 2.5, "sequential DEL": 1.0, "concurrent ADD": 1.5,
                 "concurrent DEL": 1.0}
        for key in ("sequential ADD", "sequential DEL", "concurrent ADD", "concurrent DEL"):
            if key not in ours.lat:
                continue
            ref_p = row(f"reference {key}", ref.lat[key], ref.round_p50[key])
            our_p = row(f"l3fabric {key}", ours.lat[key], ours.round_p50[key])
            ratios.append(f"{key} p50 {our_p[0] / ref_p[0]:.2f} (goal <= {goals[key]}), "
                          f"p99 {our_p[1] / ref_p[1]:.2f}")
        for verb in ("ADD", "DEL"):
            key = f"agent only {verb}"
            if key in ours.lat:
                row(f"l3fabric {args.concurrent} {verb}s at once, no exec", ours.lat[key],
                    ours.round_p50[key])
        print()
        for case in ("sequential", "concurrent"):
            if case not in ours.cpu:
                continue
            n_ref, n_ours = ref.count[case], ours.count[case]
            print(f"CPU per ADD+DEL, {case}: reference plugins "
                  f"{1000 * ref.cpu[case] / n_ref:.1f} ms; l3fabric shims "
                  f"{1000 * ours.cpu[case] / n_ours:.1f} ms + agent "
                  f"{1000 * ours.agent_cpu[case] / n_ours:.1f} ms + etcd "
                  f"{1000 * ours.etcd_cpu[case] / n_ours:.1f} ms")
        print(f"agent peak RSS {memory_kb(agent_pid)['hwm'] / 1024:.1f} MB; largest plugin process "
              f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f} MB "
              "(either side)")
        print()
        for line in ratios:
            print("ratio " + line)
        return 0
    finally:
        lab.down()
        shutil.rmtree(data_dir, ignore_errors=True)
        for name in netns.names("bencho") + netns.names("benchr"):
            netns.remove(name)


if __name__ == "__main__":
    sys.exit(main())
