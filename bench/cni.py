#!/usr/bin/env python3
"""CNI ADD/DEL latency: l3fabric's plugin against the reference ptp + host-local.

    python bench/cni.py [--runs N]

Builds a one-host lab (etcd, fabric-agent), then execs each plugin the same way a
runtime does (fresh network namespace per ADD, config on stdin, CNI_* environment,
inside the host's namespace through nsenter) and prints p50/p99 of ADD and DEL and
the ratios to the reference measured in the same run. Also printed: the cost of
`nsenter /bin/true`, which both sides pay.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the `cni` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time

from cni import invoke
from cni.install import conflist
from fabric import logs
from fabric.kernel import netns
from fabric.lab.topology import Lab

REF_DIR = "/usr/lib/cni"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(binary: str, config: dict, host_ns: str, prefix: str, runs: int
            ) -> tuple[list[float], list[float]]:
    adds, dels = [], []

    def timed(command: str, name: str) -> float:
        started = time.perf_counter()
        outcome = invoke.run(binary, command, config, container_id=name,
                             netns=netns.path(name), host_netns=host_ns,
                             cni_path=f"{Path(binary).parent}:{REF_DIR}")
        elapsed = time.perf_counter() - started
        if not outcome.ok:
            raise SystemExit(f"{binary} {command} failed: {outcome.stdout} {outcome.stderr}")
        return elapsed

    for i in range(runs):
        name = f"{prefix}{i}"
        netns.create(name)
        try:
            adds.append(timed("ADD", name))
            dels.append(timed("DEL", name))
        finally:
            netns.remove(name)
    return adds, dels


def row(name: str, values: list[float]) -> tuple[float, float]:
    p50, p99 = 1000 * statistics.median(values), 1000 * pct(values, 0.99)
    print(f"{name:<36} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   (n={len(values)})")
    return p50, p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    logs.configure("console", "warning")
    if not Path(REF_DIR, "ptp").exists():
        raise SystemExit("the reference plugins are missing: apt-get install "
                         "containernetworking-plugins")
    lab = Lab("l3bench")
    lab.down()
    data_dir = tempfile.mkdtemp(prefix="l3bench-host-local-")
    try:
        lab.create_underlay()
        lab.start_etcd()
        lab.add_pool("bench", "10.244.0.0/16")
        lab.add_host("h1")
        lab.wait_agent("h1")
        lab.install_cni()
        host_ns = netns.path(lab.state.hosts["h1"].netns)
        ours = invoke.network_config(conflist("benchnet"))
        reference = {"cniVersion": "1.0.0", "name": "refnet", "type": "ptp",
                     "ipam": {"type": "host-local", "subnet": "10.250.0.0/16",
                              "dataDir": data_dir}}
        # Warm both paths (page cache, agent's first etcd round trips), then measure,
        # interleaving so that machine noise hits both alike.
        measure(str(lab.cni_bin / "l3fabric"), ours, host_ns, "l3bw", 5)
        measure(f"{REF_DIR}/ptp", reference, host_ns, "l3bwr", 5)
        our_add, our_del, ref_add, ref_del = [], [], [], []
        for _ in range(max(1, args.runs // 10)):
            a, d = measure(str(lab.cni_bin / "l3fabric"), ours, host_ns, "l3bo", 10)
            our_add += a
            our_del += d
            a, d = measure(f"{REF_DIR}/ptp", reference, host_ns, "l3br", 10)
            ref_add += a
            ref_del += d
        overhead = []
        for _ in range(20):
            t0 = time.perf_counter()
            subprocess.run(["nsenter", f"--net={host_ns}", "/bin/true"], check=True)
            overhead.append(time.perf_counter() - t0)
        print()
        row("nsenter /bin/true (both pay it)", overhead)
        ref_add_p = row("reference ptp+host-local ADD", ref_add)
        our_add_p = row("l3fabric ADD", our_add)
        ref_del_p = row("reference ptp+host-local DEL", ref_del)
        our_del_p = row("l3fabric DEL", our_del)
        print()
        print(f"ADD p50 ratio {our_add_p[0] / ref_add_p[0]:.2f} (goal <= 3), "
              f"ADD p99 ratio {our_add_p[1] / ref_add_p[1]:.2f} (goal <= 5), "
              f"DEL p50 ratio {our_del_p[0] / ref_del_p[0]:.2f} (goal <= 1)")
        return 0
    finally:
        lab.down()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
