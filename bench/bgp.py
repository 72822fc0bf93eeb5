#!/usr/bin/env python3
"""BGP speed: bulk ingest and withdraw, new-block propagation, a dead host's routes.

    python bench/bgp.py [--prefixes N] [--trials N] [--rounds N] [--profile DIR]

1. A BIRD peer announces N prefixes (default 100,000 /30s inside an IP pool) over eBGP
   to the receiver; both sessions are Established before the clock starts: the
   sender's static protocol starts disabled and is enabled (`birdc enable`) at time 0.
   Ingest: until all N are in the receiver's kernel. Withdraw (`birdc disable`): until
   none is left. Reference, same run, same namespaces and underlay, alternating
   rounds: BIRD -> BIRD -> kernel. Receiver CPU seconds (user + system, every process
   of the receiving side) and peak RSS are printed beside the times.
2. A new block claimed on host A until its route is in host B's kernel (netlink
   events in B's namespace timestamp it), p50/p99 over --trials.
3. A host killed (link down, processes gone) until its block's route is gone from
   another host, against the configured hold time.
4. At rest: one agent with --idle-peers (40) BGP sessions, each to a BIRD of its own;
   CPU of agent + ExaBGP over 60 s, in % of a core, beside all the BIRDs' together.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the packages it measures; its parent has bench.common.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import RouteWatcher, Usage, pct
from fabric import logs
from fabric.kernel import netlink, netns
from fabric.kernel.netns import entered
from fabric.lab.peers import Bird, Neighbor, bird_config
from fabric.lab.topology import Lab
from fabric.model.peers import PeerSpec
from fabric.model.prefix import Prefix
from fabric.store import keys
from ipam.allocator import Ipam

POOL = {4: "10.64.0.0/10", 6: "fd64::/32"}  # IPv6: the /126s span fd64:0:0: and fd64:0:1:
BIRD_PROTOCOL = 12  # what BIRD writes its kernel routes with ("proto bird")


def prefixes(count: int, family: int = 4) -> list[str]:
    """`count` small prefixes inside the bench pool (IPv4 /30s, IPv6 /126s)."""
    if family == 6:
        return [f"fd64:0:{i // 65536:x}:{i % 65536:x}::/126" for i in range(count)]
    return [f"10.{64 + i // 16384}.{(i % 16384) // 64}.{(i % 64) * 4}/30"
            for i in range(count)]


def static_block(count: int, gateway: str, family: int = 4) -> str:
    """The sender's routes, in a static protocol that starts disabled."""
    routes = "\n".join(f"  route {p} via {gateway};" for p in prefixes(count, family))
    return f"protocol static bulk {{\n  disabled;\n  ipv{family};\n{routes}\n}}\n"


def kernel_count(ns: str, protocol: int, family: int = 4) -> int:
    """Routes of `protocol` in the namespace's main table, counted without decoding them.

    The kernel filters the dump by protocol (strict checking); counting message headers
    keeps the poll cheap (tens of milliseconds at 100,000 routes), and the poll is the
    same for both sides: it takes CPU the receivers would otherwise have."""
    with entered(netns.path(ns)):
        sock = netlink.RouteSocket(protocol)
    try:
        return sock.count(family)
    finally:
        sock.close()


def wait_count(ns: str, protocol: int, done: Callable[[int], bool], started: float,
               family: int, timeout: float = 180) -> float:
    while time.monotonic() - started < timeout:
        if done(kernel_count(ns, protocol, family)):
            return time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"{kernel_count(ns, protocol, family)} routes in {ns} after "
                     f"{timeout:.0f}s")


@dataclass
class Run:
    ingest: float
    withdraw: float
    cpu_ingest: float
    cpu_withdraw: float
    rss_mb: float
    cpu_by_process: dict[str, float]


def measure(sender: Bird, receiver_ns: str, protocol: int, count: int, usage: Usage,
            family: int) -> Run:
    """Enable the sender's routes, wait for the receiver's kernel; disable, wait."""
    baseline = kernel_count(receiver_ns, protocol, family)
    before = usage.by_process()
    cpu0 = sum(before.values())
    started = time.monotonic()
    sender.cli("enable", "bulk")
    ingest = wait_count(receiver_ns, protocol, lambda n: n >= baseline + count, started,
                        family)
    cpu1 = usage.cpu()
    started = time.monotonic()
    sender.cli("disable", "bulk")
    withdraw = wait_count(receiver_ns, protocol, lambda n: n <= baseline, started, family)
    after = usage.by_process()
    cpu2 = sum(after.values())
    spent = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
    return Run(ingest, withdraw, cpu1 - cpu0, cpu2 - cpu1, usage.peak_rss_mb(), spent)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the agent and its ExaBGP)."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for text in child.read_text().split():
            found += descendants(int(text))
    return found


def established(sender: Bird) -> bool:
    return "Established" in sender.cli("show", "protocols", "all", "h1")


def wait_established(sender: Bird, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not established(sender):
        if time.monotonic() > deadline:
            raise SystemExit("the sender's session never came up")
        time.sleep(0.1)
    time.sleep(1.0)  # End-of-RIB exchanged, the receiver idle again


SENDER = {4: "10.99.0.250", 6: "fd99::fa"}


def bulk_ours(count: int, profile: Path | None, family: int = 4) -> Run:
    lab = make_lab("l3bbulk", 1, ["--max-prefixes", str(count * 2)], family=family)
    try:
        sender_ns = f"{lab.name}-send"
        netns.create(sender_ns)
        lab.plug(sender_ns, "p-send", "10.99.0.250", address6="fd99::fa")
        store = lab.store()
        spec = PeerSpec("bulk", SENDER[family], 65100, max_prefixes=count * 2)
        store.put(keys.bgp_peer(spec.name), spec.to_record())
        store.close()
        host = lab.state.hosts["h1"]
        sender = Bird(sender_ns, lab.dir / "send")
        gateway = lab.router6 if family == 6 else lab.router
        sender.start(bird_config("10.99.0.250", 65100,
                                 [Neighbor("h1", host.ipv6 if family == 6 else host.ipv4,
                                           64512)], "tor",
                                 local6="fd99::fa") + static_block(count, gateway, family))
        wait_established(sender)
        agent_pid = lab.refresh().hosts["h1"].agent_pid
        usage = Usage(descendants(agent_pid))
        recorders = []
        if profile is not None:  # where the time goes, sampled from outside
            profile.mkdir(parents=True, exist_ok=True)
            exabgp = lab.call("h1", "status")["bgp_process"]["pid"]
            for name, pid in (("agent", agent_pid), ("exabgp", exabgp)):
                recorders.append(subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                     str(pid), "--threads", "--format", "raw", "--rate", "100",
                     "--output", str(profile / f"{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        try:
            return measure(sender, host.netns, 73, count, usage, family)
        finally:
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(60)
    finally:
        lab.down()


def bulk_reference(count: int, family: int = 4) -> Run:
    lab = Lab("l3bref")
    lab.down()
    try:
        lab.create_underlay(families=(4, 6))
        sender_ns, receiver_ns = f"{lab.name}-send", f"{lab.name}-recv"
        receiver_address = {4: "10.99.0.11", 6: "fd99::b"}
        for ns, port, address, address6 in (
                (sender_ns, "p-send", "10.99.0.250", "fd99::fa"),
                (receiver_ns, "p-recv", "10.99.0.11", "fd99::b")):
            netns.create(ns)
            lab.plug(ns, port, address, address6=address6)
        receiver = Bird(receiver_ns, lab.dir / "recv")
        receiver_pid = receiver.start(bird_config(
            "10.99.0.11", 64512, [Neighbor("send", SENDER[family], 65100)], "tor",
            local6="fd99::b"))
        sender = Bird(sender_ns, lab.dir / "send")
        gateway = lab.router6 if family == 6 else lab.router
        sender.start(bird_config("10.99.0.250", 65100,
                                 [Neighbor("h1", receiver_address[family], 64512)], "tor",
                                 local6="fd99::fa") + static_block(count, gateway, family))
        wait_established(sender)  # BIRD waits its 5 s connect delay here, not on the clock
        return measure(sender, receiver_ns, BIRD_PROTOCOL, count, Usage([receiver_pid]),
                       family)
    finally:
        lab.down()


def make_lab(name: str, hosts: int, agent_args: list[str], block_size: int | None = None,
             family: int = 4) -> Lab:
    """Dual-stack hosts (`family` picks the pool), sessions Established on return."""
    lab = Lab(name)
    lab.down()
    lab.create_underlay(families=(4, 6))
    lab.start_etcd()
    lab.add_pool("bench", POOL[family], block_size)
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


def block_latency(trials: int, family: int = 4) -> list[float]:
    lab = make_lab("l3bblk", 2, [], block_size=128 if family == 6 else 32, family=family)
    try:
        receiver = lab.state.hosts["h2"].netns
        watcher = RouteWatcher([receiver])
        store = lab.store()
        ipam = Ipam(store)
        latencies = []
        for trial in range(trials):
            started = time.monotonic()
            # A /32 (/128) block size: every allocation claims a new block.
            record = ipam.allocate(f"bench-{trial}.eth0", "h1", families=(family,))
            prefix = Prefix.parse(record.allocations[0].host_prefix)
            arrived = watcher.wait(prefix, [receiver], timeout=10)
            if arrived is None:
                raise SystemExit(f"{prefix} never reached h2")
            latencies.append(arrived[receiver] - started)
            time.sleep(0.05)
        store.close()
        watcher.close()
        return latencies
    finally:
        lab.down()


def dead_host(hold_time: int = 9) -> float:
    lab = make_lab("l3bdead", 3, [], 26)
    try:
        lab.add_pool("bench6", POOL[6])  # the lab's containers are dual stack
        lab.add_workload("h3")
        block = Prefix.parse(next(b.cidr for b in Ipam(lab.store()).blocks()
                                  if b.affinity == "h3"))
        observer = lab.state.hosts["h1"].netns
        watcher = RouteWatcher([observer])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "-n", lab.state.hosts["h1"].netns, "route", "show",
                               str(block)], capture_output=True, text=True).stdout:
                break
            time.sleep(0.05)
        started = time.monotonic()
        lab.kill_host("h3")
        gone = watcher.wait(block, [observer], deleted=True, timeout=60)
        watcher.close()
        return gone[observer] - started if gone else float("nan")
    finally:
        lab.down()


def idle(peers: int = 40, settle: float = 20.0, window: float = 60.0
         ) -> tuple[float, float, dict[str, float]]:
    """One agent with `peers` BGP sessions (each to a BIRD of its own, in its own
    namespace: one BIRD holding sessions to one neighbour from many local addresses
    matched every incoming connection to its first session), at rest: CPU of agent +
    ExaBGP and of all the BIRDs together over `window` seconds, in % of a core."""
    lab = make_lab("l3bidle", 1, [])
    try:
        host = lab.state.hosts["h1"]
        store = lab.store()
        birds = []
        for index in range(peers):
            address = f"10.99.0.{100 + index}"
            ns = f"{lab.name}-p{index}"
            netns.create(ns)
            lab.plug(ns, f"p-i{index}", address)
            spec = PeerSpec(f"idle{index}", address, 65100 + index)
            store.put(keys.bgp_peer(spec.name), spec.to_record())
            bird = Bird(ns, lab.dir / f"peer{index}")
            birds.append(bird.start(
                f"router id {address};\nprotocol device {{}}\nprotocol bgp p {{ local "
                f"{address} as {65100 + index}; neighbor {host.ipv4} as 64512; hold time 9; "
                "ipv4 { import all; export none; }; }\n"))
        store.close()
        deadline = time.monotonic() + 120
        while True:
            states = [p["state"] for p in lab.call("h1", "status")["peers"]]
            if len(states) == peers and all(s == "Established" for s in states):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"idle: sessions not Established: {states}")
            time.sleep(1)
        time.sleep(settle)
        ours = Usage(descendants(lab.refresh().hosts["h1"].agent_pid))
        reference = Usage(birds)
        before = ours.by_process(), reference.cpu()
        time.sleep(window)
        after = ours.by_process(), reference.cpu()
        by_process = {n: 100 * (after[0][n] - before[0].get(n, 0.0)) / window
                      for n in after[0]}
        return sum(by_process.values()), 100 * (after[1] - before[1]) / window, by_process
    finally:
        lab.down()


def report(count: int, reference: list[Run], ours: list[Run], family: int) -> None:
    def med(runs: list[Run], field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    def runs(values: list[Run], field: str) -> str:
        return ", ".join(f"{getattr(r, field):.2f}" for r in values)

    print(f"1. IPv{family}: {count} prefixes, sessions Established on both sides before the "
          "clock starts")
    for field, what in (("ingest", "ingest into the kernel"), ("withdraw", "withdraw")):
        ref, our = med(reference, field), med(ours, field)
        print(f"   {what}: BIRD->BIRD {ref:.2f}s (runs {runs(reference, field)}), "
              f"BIRD->ExaBGP->agent {our:.2f}s (runs {runs(ours, field)}); "
              f"ratio {our / ref:.2f} (goal <= 1)")
    for field, what in (("cpu_ingest", "ingest"), ("cpu_withdraw", "withdraw")):
        ref, our = med(reference, field), med(ours, field)
        print(f"   receiver CPU seconds, {what}: BIRD {ref:.2f}, agent+ExaBGP {our:.2f}; "
              f"ratio {our / max(ref, 0.01):.2f} (goal <= 2)")
    print(f"   receiver CPU seconds by process, ingest + withdraw: BIRD "
          f"{reference[-1].cpu_by_process}, ours {ours[-1].cpu_by_process} (last round)")
    print(f"   receiver peak RSS: BIRD {med(reference, 'rss_mb'):.0f} MB, agent+ExaBGP "
          f"{med(ours, 'rss_mb'):.0f} MB (goal <= 150 MB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", action="append", default=[], choices=("bulk", "block",
                                                                         "dead", "idle"))
    parser.add_argument("--idle-peers", type=int, default=40)
    parser.add_argument("--family", choices=("4", "6", "both"), default="both",
                        help="IPv4, IPv6 or both (default both)")
    parser.add_argument("--profile", type=Path,
                        help="record the agent with py-spy during each bulk run, into DIR")
    args = parser.parse_args()
    logs.configure("console", "warning")
    families = (4, 6) if args.family == "both" else (int(args.family),)
    if "bulk" not in args.skip:
        for family in families:
            ours: list[Run] = []
            reference: list[Run] = []
            for index in range(args.rounds):  # alternate: machine noise hits both alike
                reference.append(bulk_reference(args.prefixes, family))
                profile = args.profile / f"ipv{family}-round{index}" if args.profile else None
                ours.append(bulk_ours(args.prefixes, profile, family))
            report(args.prefixes, reference, ours, family)
    if "block" not in args.skip:
        for family in families:
            latencies = block_latency(args.trials, family)
            print(f"2. IPv{family}: new block on A until in B's kernel ({len(latencies)} "
                  f"trials): p50 {1000 * statistics.median(latencies):.0f} ms, "
                  f"p99 {1000 * pct(latencies, 0.99):.0f} ms (goal p50 < 100 ms)")
    if "dead" not in args.skip:
        gone = dead_host()
        print(f"3. host killed until its routes are gone elsewhere: {gone:.1f}s "
              f"(hold time 9 s; ratio to hold time {gone / 9:.2f})")
    if "idle" not in args.skip:
        at_rest, bird, by_process = idle(args.idle_peers)
        parts = ", ".join(f"{k} {v:.2f}%" for k, v in sorted(by_process.items()))
        print(f"4. at rest with {args.idle_peers} BGP sessions: agent + ExaBGP {at_rest:.2f}% "
              f"of a core ({parts}; goal < 1%); the {args.idle_peers} BIRDs at the other ends "
              f"together {bird:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
