#!/usr/bin/env python3
"""The kernel write path alone: 100,000 routes installed and removed in a namespace.

    python bench/kernel.py [--routes N]

Our batched netlink writer (`fabric.kernel.netlink.RouteSocket`) against `ip -batch`
(the practical limit, measured in the same run on the same namespace), and the goal of
50,000 routes/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import argparse
import subprocess
import tempfile
import time

from fabric.kernel import netns
from fabric.kernel.netlink import RouteSocket
from fabric.kernel.netns import entered
from fabric.kernel.routes import remote
from fabric.model.prefix import Prefix

NS = "l3bench-kernel"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=100_000)
    args = parser.parse_args()
    netns.remove(NS)
    netns.create(NS)
    try:
        for command in (["link", "add", "a0", "type", "veth", "peer", "name", "a1"],
                        ["addr", "add", "10.1.0.1/24", "dev", "a0"],
                        ["link", "set", "a0", "up"], ["link", "set", "a1", "up"]):
            subprocess.run(["ip", "-n", NS, *command], check=True)
        routes = [remote(Prefix(4, (10 << 24) | (100 << 16) + 4 * i, 30), ["10.1.0.2"])
                  for i in range(args.routes)]
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as batch:
            for route in routes:
                batch.write(f"route add {route.prefix} via 10.1.0.2 proto 74\n")
            batch.flush()
            t0 = time.perf_counter()
            subprocess.run(["ip", "-n", NS, "-batch", batch.name], check=True)
            reference = time.perf_counter() - t0
        subprocess.run(["ip", "-n", NS, "route", "flush", "proto", "74"], check=True)
        with entered(netns.path(NS)):
            sock = RouteSocket(73)
        t0 = time.perf_counter()
        failures = sock.apply(routes)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        dumped = sock.dump()
        dump = time.perf_counter() - t0
        t0 = time.perf_counter()
        sock.apply(delete=routes)
        removal = time.perf_counter() - t0
        sock.close()
        n = args.routes
        print(f"ip -batch: {n} routes in {reference:.2f}s ({n / reference:,.0f}/s)")
        print(f"RouteSocket.apply: {n} routes in {ours:.2f}s ({n / ours:,.0f}/s), "
              f"{len(failures)} refused; dump {len(dumped)} in {dump:.2f}s; "
              f"delete in {removal:.2f}s")
        print(f"ratio to ip -batch {ours / reference:.2f}; rate vs goal 50,000/s: "
              f"{n / ours / 50_000:.2f}")
        return 0 if not failures and len(dumped) == n else 1
    finally:
        netns.remove(NS)


if __name__ == "__main__":
    sys.exit(main())
