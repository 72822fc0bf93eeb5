#!/usr/bin/env python3
"""BGP speed: bulk ingest, new-block propagation, and a dead host's routes going away.

    python bench/bgp.py [--prefixes N] [--trials N] [--rounds N]

1. A BIRD peer announces N prefixes (default 100,000 /30s inside an IP pool) over
   eBGP; time from starting that BIRD until all N are in the receiving host's kernel.
   Reference, same run, same namespaces and underlay: BIRD to BIRD to kernel.
2. A new block claimed on host A until its route is in host B's kernel (netlink
   events in B's namespace timestamp it), p50/p99 over --trials.
3. A host killed (link down, processes gone) until its block's route is gone from
   another host, against the configured hold time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the packages it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

import argparse
import statistics
import subprocess
import threading
import time

from fabric import logs
from fabric.kernel import netlink, netns
from fabric.kernel.netns import entered
from fabric.lab.peers import Bird, Neighbor, bird_config
from fabric.lab.topology import Lab
from fabric.model.prefix import Prefix
from ipam.allocator import Ipam

POOL = "10.64.0.0/10"


def prefixes(count: int) -> list[str]:
    return [f"10.{64 + i // 16384}.{(i % 16384) // 64}.{(i % 64) * 4}/30"
            for i in range(count)]


def static_block(count: int, gateway: str) -> str:
    routes = "\n".join(f"  route {p} via {gateway};" for p in prefixes(count))
    return f"protocol static bulk {{\n  ipv4;\n{routes}\n}}\n"


def kernel_count(ns: str, protocol: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "route", "show", "proto", protocol],
                         capture_output=True, text=True, check=True).stdout
    return out.count("\n")


def wait_count(ns: str, protocol: str, count: int, started: float, timeout: float = 120
               ) -> float:
    while time.monotonic() - started < timeout:
        if kernel_count(ns, protocol) >= count:
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"only {kernel_count(ns, protocol)} of {count} routes in {ns} "
                     f"after {timeout:.0f}s")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_lab(name: str, hosts: int, agent_args: list[str], block_size: int = 26) -> Lab:
    lab = Lab(name)
    lab.down()
    lab.create_underlay()
    lab.start_etcd()
    lab.add_pool("bench", POOL, block_size)
    for index in range(1, hosts + 1):
        lab.add_host(f"h{index}", agent_args=agent_args)
    for index in range(1, hosts + 1):
        lab.wait_agent(f"h{index}")
    deadline = time.monotonic() + 30  # measure from established sessions, not set-up
    while hosts > 1 and time.monotonic() < deadline:
        peers = [p for i in range(1, hosts + 1)
                 for p in lab.wait_agent(f"h{i}")["peers"]]
        if peers and all(p["state"] == "Established" for p in peers):
            break
        time.sleep(0.1)
    return lab


def bulk_ours(count: int) -> float:
    lab = make_lab("l3bbulk", 1, ["--max-prefixes", str(count * 2)])
    try:
        sender_ns = f"{lab.name}-send"
        netns.create(sender_ns)
        lab.plug(sender_ns, "p-send", "10.99.0.250")
        store = lab.store()
        from fabric.model.peers import PeerSpec
        from fabric.store import keys

        spec = PeerSpec("bulk", "10.99.0.250", 65100, max_prefixes=count * 2)
        store.put(keys.bgp_peer(spec.name), spec.to_record())
        store.close()
        time.sleep(1.0)  # the agent has configured the neighbor
        host = lab.state.hosts["h1"]
        config = bird_config("10.99.0.250", 65100, [Neighbor("h1", host.address, 64512)],
                             "tor") + static_block(count, lab.router)
        started = time.monotonic()
        Bird(sender_ns, lab.dir / "send").start(config)
        return wait_count(host.netns, "73", count, started)
    finally:
        lab.down()


def bulk_reference(count: int) -> float:
    lab = Lab("l3bref")
    lab.down()
    try:
        lab.create_underlay()
        sender_ns, receiver_ns = f"{lab.name}-send", f"{lab.name}-recv"
        for ns, port, address in ((sender_ns, "p-send", "10.99.0.250"),
                                  (receiver_ns, "p-recv", "10.99.0.11")):
            netns.create(ns)
            lab.plug(ns, port, address)
        receiver = Bird(receiver_ns, lab.dir / "recv")
        receiver.start(bird_config("10.99.0.11", 64512,
                                   [Neighbor("send", "10.99.0.250", 65100)], "tor"))
        config = bird_config("10.99.0.250", 65100, [Neighbor("recv", "10.99.0.11", 64512)],
                             "tor") + static_block(count, lab.router)
        started = time.monotonic()
        Bird(sender_ns, lab.dir / "send").start(config)
        return wait_count(receiver_ns, "bird", count, started)
    finally:
        lab.down()


class RouteWatcher:
    """Timestamps of route events (new or deleted) in a namespace, by prefix."""

    def __init__(self, ns: str, protocol: int = 73) -> None:
        with entered(netns.path(ns)):
            self.sock = netlink.RouteSocket(protocol, groups=netlink.RTMGRP_IPV4_ROUTE)
        self.protocol = protocol
        self.added: dict[Prefix, float] = {}
        self.deleted: dict[Prefix, float] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            for msg in self.sock.events(timeout=0.2):
                event = netlink.route_event(msg, self.protocol)
                if event is not None:
                    deleted, route = event
                    (self.deleted if deleted else self.added)[route.prefix] = time.monotonic()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


def block_latency(trials: int) -> list[float]:
    lab = make_lab("l3bblk", 2, [], block_size=32)
    try:
        watcher = RouteWatcher(lab.state.hosts["h2"].netns)
        store = lab.store()
        ipam = Ipam(store)
        latencies = []
        for trial in range(trials):
            started = time.monotonic()
            record = ipam.allocate(f"bench-{trial}.eth0", "h1")  # a /32 pool: a new block
            prefix = Prefix.parse(record.allocations[0].host_prefix)
            deadline = started + 10
            while prefix not in watcher.added and time.monotonic() < deadline:
                time.sleep(0.001)
            if prefix not in watcher.added:
                raise SystemExit(f"{prefix} never reached h2")
            latencies.append(watcher.added[prefix] - started)
            time.sleep(0.05)
        store.close()
        watcher.close()
        return latencies
    finally:
        lab.down()


def dead_host(hold_time: int = 9) -> float:
    lab = make_lab("l3bdead", 3, [])
    try:
        lab.add_workload("h3")
        block = Prefix.parse(next(b.cidr for b in Ipam(lab.store()).blocks()
                                  if b.affinity == "h3"))
        watcher = RouteWatcher(lab.state.hosts["h1"].netns)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "-n", lab.state.hosts["h1"].netns, "route", "show",
                               str(block)], capture_output=True, text=True).stdout:
                break
            time.sleep(0.05)
        started = time.monotonic()
        lab.kill_host("h3")
        while block not in watcher.deleted and time.monotonic() - started < 60:
            time.sleep(0.01)
        watcher.close()
        return watcher.deleted.get(block, float("nan")) - started
    finally:
        lab.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", action="append", default=[], choices=("bulk", "block",
                                                                         "dead"))
    args = parser.parse_args()
    logs.configure("console", "warning")
    if "bulk" not in args.skip:
        ours, reference = [], []
        for _ in range(args.rounds):  # alternate, so machine noise hits both alike
            reference.append(bulk_reference(args.prefixes))
            ours.append(bulk_ours(args.prefixes))
        ref, our = statistics.median(reference), statistics.median(ours)
        print(f"1. {args.prefixes} prefixes into the kernel: BIRD->BIRD {ref:.2f}s "
              f"(runs {', '.join(f'{r:.2f}' for r in reference)}), BIRD->ExaBGP->agent "
              f"{our:.2f}s (runs {', '.join(f'{r:.2f}' for r in ours)}); "
              f"ratio {our / ref:.2f} (goal <= 1)")
    if "block" not in args.skip:
        latencies = block_latency(args.trials)
        print(f"2. new block on A until in B's kernel ({len(latencies)} trials): "
              f"p50 {1000 * statistics.median(latencies):.0f} ms, "
              f"p99 {1000 * pct(latencies, 0.99):.0f} ms (goal p50 < 100 ms)")
    if "dead" not in args.skip:
        gone = dead_host()
        print(f"3. host killed until its routes are gone elsewhere: {gone:.1f}s "
              f"(hold time 9 s; ratio to hold time {gone / 9:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
