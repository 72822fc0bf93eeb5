#!/usr/bin/env python3
"""IPAM throughput and latency against a real etcd, with etcd's own round trip as the
reference measured in the same run.

    python bench/ipam.py [--per-worker N]

Prints allocations/s and p50/p99 latency for 1 worker and for 3 hosts x 8 workers
(24 separate processes, the worst case; and 3 processes x 8 threads, which is how
each host's agent serves concurrent CNI ADDs), the etcd compare-and-swap round trip
measured the same way, the ratios between them, and the duplicates found afterwards (must be 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the `ipam` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from fabric import logs
from fabric.lab.etcd import EtcdServer
from fabric.model.pools import parse_pool
from fabric.settings import EtcdSettings, parse_endpoints
from fabric.store.datastore import Datastore, absent, put
from fabric.store.keys import ROOT
from ipam.allocator import Ipam
from ipam.check import check

HOSTS, WORKERS = 3, 8


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _store(endpoint: str) -> Datastore:
    logs.configure("console", "warning")
    return Datastore.connect(EtcdSettings(endpoints=parse_endpoints(endpoint)))


def cas_worker(endpoint: str, tag: str, count: int, barrier, out) -> None:
    """The reference: one compare-and-swap create per operation, nothing else."""
    store = _store(endpoint)
    store.ping()
    barrier.wait()
    lat = []
    for i in range(count):
        key = f"{ROOT}bench/{tag}/{i}"
        t0 = time.perf_counter()
        store.txn([absent(key)], [put(key, {"i": i})])
        lat.append(time.perf_counter() - t0)
    out.put((lat, {}))


def alloc_worker(endpoint: str, host: str, tag: str, count: int, barrier, out) -> None:
    store = _store(endpoint)
    ipam = Ipam(store)
    store.ping()
    barrier.wait()
    lat = []
    for i in range(count):
        t0 = time.perf_counter()
        ipam.allocate(f"{tag}-{i}.eth0", host)
        lat.append(time.perf_counter() - t0)
    out.put((lat, dict(ipam.stats)))


def agent_worker(endpoint: str, host: str, tag: str, count: int, barrier, out) -> None:
    """One process per host with WORKERS threads: how the agent serves concurrent ADDs."""
    import threading

    store = _store(endpoint)
    ipam = Ipam(store)
    store.ping()
    lat: list[float] = []

    def serve(worker: int) -> None:
        for i in range(count):
            t0 = time.perf_counter()
            ipam.allocate(f"{tag}-{worker}-{i}.eth0", host)
            lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(WORKERS)]
    barrier.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((lat, dict(ipam.stats)))


def run_parallel(target, jobs: list[tuple]) -> tuple[float, list[float], Counter]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(jobs) + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*job, barrier, out)) for job in jobs]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    latencies: list[float] = []
    stats: Counter = Counter()
    for _ in procs:
        lat, counts = out.get()
        latencies += lat
        stats.update(counts)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    return elapsed, latencies, stats


def report(name: str, elapsed: float, lat: list[float], stats: Counter) -> dict[str, float]:
    row = {"ops_per_s": len(lat) / elapsed, "p50_ms": 1000 * statistics.median(lat),
           "p99_ms": 1000 * pct(lat, 0.99)}
    print(f"{name:<34} {len(lat):>6} ops  {row['ops_per_s']:>8.0f}/s  "
          f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms")
    if stats:
        print(f"{'':<34} " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-worker", type=int, default=150)
    parser.add_argument("--single", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="l3bench-") as tmp:
        etcd = EtcdServer.start(Path(tmp), name="l3bench-etcd")
        try:
            endpoint = etcd.endpoint
            store = _store(endpoint)
            Ipam(store).add_pool(parse_pool("bench", "10.128.0.0/14", 26))

            ref1 = report("etcd CAS, 1 client", *run_parallel(
                cas_worker, [(endpoint, "ref1", args.single)]))
            one = report("allocate, 1 worker", *run_parallel(
                alloc_worker, [(endpoint, "host-a", "one", args.single)]))
            ref24 = report(f"etcd CAS, {HOSTS}x{WORKERS} clients", *run_parallel(
                cas_worker, [(endpoint, f"ref{i}", args.per_worker) for i in range(24)]))
            many = report(f"allocate, {HOSTS} hosts x {WORKERS} workers", *run_parallel(
                alloc_worker, [(endpoint, f"host-{h}", f"m{h}-{w}", args.per_worker)
                               for h in range(HOSTS) for w in range(WORKERS)]))
            agents = report(f"allocate, {HOSTS} agents x {WORKERS} threads", *run_parallel(
                agent_worker, [(endpoint, f"host-{h}", f"t{h}", args.per_worker)
                               for h in range(HOSTS)]))
            report_ = check(Ipam(store).snapshot())
            duplicates = report_.counts["duplicate"]
            used = report_.counts["addresses_used"]
            print()
            print(f"round trips per allocation (p50 alloc / p50 CAS, 1 worker): "
                  f"{one['p50_ms'] / ref1['p50_ms']:.2f}")
            print(f"aggregate allocations/s vs etcd CAS/s ({HOSTS}x{WORKERS}): "
                  f"{many['ops_per_s'] / ref24['ops_per_s']:.2f}")
            print(f"aggregate allocations/s vs goal 1000/s: processes "
                  f"{many['ops_per_s'] / 1000:.2f}, agents {agents['ops_per_s'] / 1000:.2f}")
            print(f"addresses in use {used}, duplicates {duplicates} (must be 0)")
            store.close()
            return 0 if duplicates == 0 else 1
        finally:
            etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
