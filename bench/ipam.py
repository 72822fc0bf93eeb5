#!/usr/bin/env python3
"""IPAM allocations/s through the real CNI path, against etcd's own compare-and-swap
rate measured in the same run on the same etcd.

    python bench/ipam.py [--per-worker N] [--rounds R] [--exec-per-worker M]

Builds a 3-host lab (etcd on the underlay, one fabric-agent per host). Cases, each
3 hosts x 8 concurrent clients, alternating in rounds so machine noise hits all alike:

  etcd CAS       the reference: one `txn` creating a key with a `version == 0` compare
                 per operation, 24 clients (3 processes x 8 threads, each process in a
                 host's namespace, over the underlay like the agents);
  CNI ADD        the real path: an ADD of the IPAM plugin (`l3fabric-ipam`, what another
                 main plugin such as ptp execs) to each host's agent, which allocates
                 and registers the workload in etcd. The clients connect to the agent's
                 CNI socket and speak the shim's protocol (the request, the container's
                 network namespace passed as a descriptor), because exec'ing the shim
                 costs more CPU than the agent's work: with `--exec-per-worker` the
                 shim is also exec'd (through nsenter) to show that cost;
  CNI ADD+DEL    the same ADDs, each followed by its DEL (not timed in the latency, but
                 in the rate): the fabric does not grow, which separates what the
                 agents' cost per registration owes to the number of workloads;
  library        `Ipam.allocate` in 3 processes x 8 threads, the agent's allocator
                 without the CNI layer (explains the difference).

Printed per case: allocations/s (each round, and the median), p50/p99 latency; for the
CNI case the agents' and etcd's CPU seconds per allocation and the agents' peak RSS;
then the ratios, and `ipam.check` over everything allocated (duplicates must be 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the `ipam` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.common

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.common import cpu_seconds, memory_kb, pct
from cni import invoke
from cni.shim import DEFAULT_SOCKET, FIELDS, encode_request, socket_address
from fabric import logs
from fabric.kernel import netns
from fabric.lab.topology import Lab
from fabric.settings import EtcdSettings, parse_endpoints
from fabric.store.datastore import Datastore, absent, put
from fabric.store.keys import ROOT
from ipam.allocator import Ipam
from ipam.check import check

LAB = "benchipam"
HOSTS, WORKERS = 3, 8
IPAM_PLUGIN = "l3fabric-ipam"


def _enter(ns_path: str) -> None:
    """Move this (new, still single-threaded) process into a host's namespace: threads
    it starts later, gRPC's included, are born there."""
    from fabric.kernel.netns import setns

    fd = os.open(ns_path, os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


def _store(endpoint: str) -> Datastore:
    logs.configure("console", "warning")
    return Datastore.connect(EtcdSettings(endpoints=parse_endpoints(endpoint)))


def _threads(count: int, work: Callable[[int], list[float]], barrier: Any) -> list[float]:
    """Run work(0..count-1) on threads started once every process is ready."""
    results: list[list[float]] = [[] for _ in range(count)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    barrier.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [x for r in results for x in r]


# -- workers (each a spawned process, one per host) -----------------------------------
def cas_worker(host_ns: str, endpoint: str, tag: str, count: int, barrier: Any,
               out: Any) -> None:
    """The reference: compare-and-swap creates, nothing else."""
    _enter(host_ns)
    store = _store(endpoint)
    store.ping()

    def work(w: int) -> list[float]:
        lat = []
        for i in range(count):
            key = f"{ROOT}bench/{tag}/{w}/{i}"
            t0 = time.perf_counter()
            store.txn([absent(key)], [put(key, {"i": i})])
            lat.append(time.perf_counter() - t0)
        return lat

    out.put((_threads(WORKERS, work, barrier), {}))


def _cni_request(container: str, ns_path: str, ns_fd: int, stdin: bytes,
                 command: str = "ADD") -> bytes:
    """One request as the shim sends it: framed fields, the namespace as a descriptor."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": ns_path, "CNI_IFNAME": "eth0", "CNI_ARGS": "",
           "CNI_PATH": "/opt/cni/bin"}
    values = [IPAM_PLUGIN.encode()] + [env[k].encode() for k in FIELDS[1:-1]] + [stdin]
    payload = encode_request(values)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_address(DEFAULT_SOCKET))
        sent = sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         ns_fd.to_bytes(4, sys.byteorder))])
        sock.sendall(payload[sent:])
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks)


def cni_worker(host_ns: str, container_ns: str, tag: str, count: int, barrier: Any,
               out: Any, steady: bool = False) -> None:
    """CNI ADDs of the IPAM plugin to this host's agent over its socket; `steady`: each
    followed by its DEL (timed apart), so the fabric does not grow."""
    _enter(host_ns)
    ns_fd = os.open(container_ns, os.O_RDONLY)
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "benchnet", "type": "ptp",
                        "ipam": {"type": IPAM_PLUGIN}}).encode()

    def work(w: int) -> list[float]:
        lat = []
        for i in range(count):
            t0 = time.perf_counter()
            reply = _cni_request(f"{tag}-{w}-{i}", container_ns, ns_fd, stdin)
            lat.append(time.perf_counter() - t0)
            if not reply.startswith(b"0\n"):
                raise RuntimeError(f"ADD failed: {reply[:300]!r}")
            if steady:
                reply = _cni_request(f"{tag}-{w}-{i}", container_ns, ns_fd, stdin, "DEL")
                if not reply.startswith(b"0\n"):
                    raise RuntimeError(f"DEL failed: {reply[:300]!r}")
        return lat

    out.put((_threads(WORKERS, work, barrier), {}))


def exec_worker(host_ns: str, container_ns: str, tag: str, count: int, barrier: Any,
                out: Any, cni_bin: str = "") -> None:
    """The steady case's ADDs and DELs through the installed shim, exec'd as a runtime
    would (through nsenter); only the ADDs are in the latency."""
    config = {"cniVersion": "1.0.0", "name": "benchnet", "type": "ptp",
              "ipam": {"type": IPAM_PLUGIN}}

    def work(w: int) -> list[float]:
        lat = []
        for i in range(count):
            t0 = time.perf_counter()
            outcome = invoke.run(f"{cni_bin}/{IPAM_PLUGIN}", "ADD", config,
                                 container_id=f"{tag}-{w}-{i}", netns=container_ns,
                                 host_netns=host_ns)
            lat.append(time.perf_counter() - t0)
            if not outcome.ok:
                raise RuntimeError(f"ADD failed: {outcome.stdout}")
            outcome = invoke.run(f"{cni_bin}/{IPAM_PLUGIN}", "DEL", config,
                                 container_id=f"{tag}-{w}-{i}", netns=container_ns,
                                 host_netns=host_ns)
            if not outcome.ok:
                raise RuntimeError(f"DEL failed: {outcome.stdout}")
        return lat

    out.put((_threads(WORKERS, work, barrier), {}))


def library_worker(host_ns: str, endpoint: str, tag: str, count: int, barrier: Any,
                   out: Any) -> None:
    """`Ipam.allocate` in threads, as the agent calls it (nodes other than the lab's)."""
    _enter(host_ns)
    store = _store(endpoint)
    ipam = Ipam(store)
    store.ping()

    def work(w: int) -> list[float]:
        lat = []
        for i in range(count):
            t0 = time.perf_counter()
            ipam.allocate(f"{tag}-{w}-{i}.eth0", f"lib-{tag}")
            lat.append(time.perf_counter() - t0)
        return lat

    out.put((_threads(WORKERS, work, barrier), dict(ipam.stats)))


def run_parallel(target: Callable[..., None], jobs: list[tuple[Any, ...]]
                 ) -> tuple[float, list[float], Counter[str]]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(jobs) + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*job[:4], barrier, out, *job[4:]))
             for job in jobs]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    latencies: list[float] = []
    stats: Counter[str] = Counter()
    for _ in procs:
        lat, counts = out.get()
        latencies += lat
        stats.update(counts)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a worker failed (exit {p.exitcode})")
    return elapsed, latencies, stats


class Case:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rates: list[float] = []
        self.lat: list[float] = []
        self.stats: Counter[str] = Counter()
        self.cpu: dict[str, float] = {"agents": 0.0, "etcd": 0.0}
        self.ops = 0

    def add(self, elapsed: float, lat: list[float], stats: Counter[str]) -> None:
        self.rates.append(len(lat) / elapsed)
        self.lat += lat
        self.stats.update(stats)
        self.ops += len(lat)

    def rate(self) -> float:
        return statistics.median(self.rates)

    def print(self) -> None:
        rounds = ", ".join(f"{r:.0f}" for r in self.rates)
        print(f"{self.name:<42} {self.rate():6.0f}/s (rounds {rounds})  "
              f"p50 {1000 * statistics.median(self.lat):6.2f} ms  "
              f"p99 {1000 * pct(self.lat, 0.99):6.2f} ms  n={self.ops}")
        if self.stats:
            print(f"{'':<42} " + ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())))
        if any(self.cpu.values()):
            print(f"{'':<42} CPU per allocation: " + ", ".join(
                f"{k} {1000 * v / self.ops:.2f} ms" for k, v in sorted(self.cpu.items())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-worker", type=int, default=100,
                        help="operations per client per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exec-per-worker", type=int, default=0,
                        help="also exec the shim this many times per client (slow)")
    parser.add_argument("--skip-library", action="store_true")
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--profile", type=Path,
                        help="py-spy the first host's agent during the CNI case into DIR")
    args = parser.parse_args()
    logs.configure("console", "warning")
    lab = Lab(LAB)
    lab.down()
    containers = [f"benchipc{h}" for h in range(HOSTS)]
    try:
        lab.create_underlay()
        lab.start_etcd()
        lab.add_pool("bench", "10.128.0.0/14", 26)
        hosts = [f"h{h + 1}" for h in range(HOSTS)]
        for name in hosts:
            lab.add_host(name)
        for name in hosts:
            lab.wait_agent(name)
        lab.install_cni()
        state = lab.refresh()
        host_ns = [netns.path(state.hosts[n].netns) for n in hosts]
        agents = [state.hosts[n].agent_pid or 0 for n in hosts]
        etcd_pid = state.etcd_pid or 0
        for name in containers:
            netns.create(name)
        endpoint = lab.etcd_endpoint
        cas = Case(f"etcd CAS, {HOSTS}x{WORKERS} clients (reference)")
        cni = Case(f"CNI ADD via agents, {HOSTS} hosts x {WORKERS}")
        steady = Case(f"CNI ADD then DEL via agents, {HOSTS}x{WORKERS}")
        lib = Case(f"library allocate, {HOSTS} procs x {WORKERS} threads")
        shim = Case(f"CNI ADD then DEL, shim exec'd, {HOSTS}x{WORKERS}")
        n = args.per_worker
        # Warm-up: the agents' first block claims and etcd connections.
        run_parallel(cni_worker, [(host_ns[h], netns.path(containers[h]), f"w{h}", 3)
                                  for h in range(HOSTS)])
        def measured(case: Case, jobs: list[tuple[Any, ...]], r: int, tag: str) -> None:
            """One CNI round, with the agents' and etcd's CPU (and py-spy, if asked)."""
            spy = None
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                     str(agents[0]), "--rate", "200", "--format", "raw", "--threads",
                     "--nonblocking", "--output", str(args.profile / f"{tag}-{r}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            before = [cpu_seconds(p) for p in (*agents, etcd_pid)]
            case.add(*run_parallel(cni_worker, jobs))
            after = [cpu_seconds(p) for p in (*agents, etcd_pid)]
            case.cpu["agents"] += sum(after[:HOSTS]) - sum(before[:HOSTS])
            case.cpu["etcd"] += after[HOSTS] - before[HOSTS]
            if spy is not None:
                spy.send_signal(2)
                spy.wait(timeout=60)

        if args.exec_per_worker:  # before the fabric grows, like the steady case
            shim.add(*run_parallel(exec_worker, [
                (host_ns[h], netns.path(containers[h]), f"e{h}", args.exec_per_worker,
                 str(lab.cni_bin)) for h in range(HOSTS)]))
        # First the steady case, while the fabric holds (almost) no workloads; then the
        # case that keeps every address (the fabric grows by 24 x N a round).
        if not args.skip_steady:
            for r in range(args.rounds):
                cas.add(*run_parallel(cas_worker, [(host_ns[h], endpoint, f"q{r}h{h}", n)
                                                   for h in range(HOSTS)]))
                measured(steady, [(host_ns[h], netns.path(containers[h]), f"s{r}h{h}", n,
                                   True) for h in range(HOSTS)], r, "steady")
        for r in range(args.rounds):
            cas.add(*run_parallel(cas_worker, [(host_ns[h], endpoint, f"r{r}h{h}", n)
                                               for h in range(HOSTS)]))
            measured(cni, [(host_ns[h], netns.path(containers[h]), f"c{r}h{h}", n)
                           for h in range(HOSTS)], r, "add")
            if not args.skip_library:
                lib.add(*run_parallel(library_worker, [(host_ns[h], endpoint, f"l{r}h{h}", n)
                                                       for h in range(HOSTS)]))
        store = lab.store()
        try:
            report = check(Ipam(store).snapshot())
        finally:
            store.close()
        print()
        for case in (cas, cni, steady, lib, shim):
            if case.rates:
                case.print()
        print(f"{'':<42} agents' peak RSS: " + ", ".join(
            f"{memory_kb(p)['hwm'] / 1024:.1f} MB" for p in agents))
        print()
        ratio = cni.rate() / cas.rate()
        print(f"CNI ADD allocations/s vs etcd CAS/s ({HOSTS}x{WORKERS}): {ratio:.2f} "
              f"(goal >= 0.8), vs 1,000/s: {cni.rate() / 1000:.2f} (goal >= 1)")
        if steady.rates:
            print(f"ADDs/s with a DEL each (the fabric does not grow) vs etcd CAS/s: "
                  f"{steady.rate() / cas.rate():.2f}")
        if lib.rates:
            print(f"library allocations/s vs etcd CAS/s: {lib.rate() / cas.rate():.2f}")
        if shim.rates:
            print(f"ADD+DEL with the shim exec'd: {shim.rate():.0f}/s, "
                  f"{shim.rate() / cas.rate():.2f} of CAS")
        duplicates = report.counts["duplicate"]
        print(f"addresses in use {report.counts['addresses_used']}, duplicates {duplicates} "
              "(must be 0)")
        return 0 if duplicates == 0 else 1
    finally:
        lab.down()
        for name in containers:
            netns.remove(name)


if __name__ == "__main__":
    sys.exit(main())
