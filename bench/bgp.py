#!/usr/bin/env python3
"""BGP speed: bulk ingest and withdraw, new-block propagation, a dead host's routes.

    python bench/bgp.py [--prefixes N] [--trials N] [--rounds N] [--profile DIR]
                        [--skip bulk|block|dead|idle] [--family 4|6|both]

1. A BIRD peer announces N prefixes (default 100,000 /30s inside an IP pool) over eBGP
   to the receiver; both sessions are Established before the clock starts: the
   sender's static protocol starts disabled and is enabled (`birdc enable`) at time 0.
   Ingest: until all N are in the receiver's kernel. Withdraw (`birdc disable`): until
   none is left. Reference, same run, alternating rounds: BIRD -> BIRD -> kernel, in
   namespaces of its own on an underlay built the same way (our lab also runs etcd).
   Receiver CPU seconds (user + system, every process of the receiving side) and peak
   RSS are printed beside the times.
2. A new block claimed on host A until its route is in host B's kernel (netlink
   events in B's namespace timestamp it), p50/p99 over --trials. Reference, same run,
   trial by trial in turn: BIRD -> BIRD, `birdc enable` of a one-route static protocol
   (prepared disabled, one per trial) until the route is in the receiving BIRD's
   kernel, timed by the same netlink watcher.
3. A host killed (link down, processes gone) until its block's route is gone from
   another host. Reference, same run: BIRD -> BIRD with the same timers (hold time
   9 s, keepalive 3 s, graceful restart on), the sender's underlay link down and its
   BIRD killed the same way, until the receiving BIRD's kernel lost the route.
4. At rest: one agent with --idle-peers (40) BGP sessions, each to a BIRD of its own;
   CPU of agent + ExaBGP over --idle-window (60 s), in % of a core. Reference, same
   window (both labs up at once): one BIRD holding as many sessions to the same kind
   of peers, same timers. With --profile DIR, py-spy records agent and ExaBGP for
   another window at rest and DIR/idle-summary.txt says where the CPU goes.

Reference labs (BIRD only, no etcd) are separate namespaces on an underlay built the
same way (bridge, router addresses); they are removed at the end, also on failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's folder would shadow the packages it measures; its parent has bench.common.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import TICK, RouteWatcher, Usage, pct
from bench.spy_summary import summarise
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
RECEIVER = {4: "10.99.0.11", 6: "fd99::b"}  # where our first host would be


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


def bird_namespaces(lab: Lab) -> tuple[str, str]:
    """The reference's two namespaces on an underlay built like ours: the sending BIRD
    at .250 (::fa), the receiving one at .11 (::b), where our first host would be."""
    lab.create_underlay(families=(4, 6))
    sender_ns, receiver_ns = f"{lab.name}-send", f"{lab.name}-recv"
    for ns, port, address, address6 in ((sender_ns, "p-send", SENDER[4], SENDER[6]),
                                        (receiver_ns, "p-recv", RECEIVER[4], RECEIVER[6])):
        netns.create(ns)
        lab.plug(ns, port, address, address6=address6)
    return sender_ns, receiver_ns


def bulk_reference(count: int, family: int = 4) -> Run:
    lab = Lab("l3bref")
    lab.down()
    try:
        sender_ns, receiver_ns = bird_namespaces(lab)
        receiver = Bird(receiver_ns, lab.dir / "recv")
        receiver_pid = receiver.start(bird_config(
            "10.99.0.11", 64512, [Neighbor("send", SENDER[family], 65100)], "tor",
            local6="fd99::b"))
        sender = Bird(sender_ns, lab.dir / "send")
        gateway = lab.router6 if family == 6 else lab.router
        sender.start(bird_config("10.99.0.250", 65100,
                                 [Neighbor("h1", RECEIVER[family], 64512)], "tor",
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
    try:
        lab.create_underlay(families=(4, 6))
        lab.start_etcd()
        lab.add_pool("bench", POOL[family], block_size)
        for index in range(1, hosts + 1):
            lab.add_host(f"h{index}", agent_args=agent_args)
        for index in range(1, hosts + 1):
            lab.wait_agent(f"h{index}")
        deadline = time.monotonic() + 30  # measure from established sessions, not set-up
        while hosts > 1:
            peers = [(f"h{i}", p) for i in range(1, hosts + 1)
                     for p in lab.wait_agent(f"h{i}")["peers"]]
            if peers and all(p["state"] == "Established" for _, p in peers):
                break
            if time.monotonic() > deadline:
                states = ", ".join(f"{h}->{p.get('address', p.get('name', '?'))} {p['state']}"
                                   for h, p in peers) or "no peers"
                raise SystemExit(f"{name}: BGP sessions not Established after 30 s ({states}); "
                                 "not measuring from a half-up lab")
            time.sleep(0.1)
    except BaseException:  # set-up failed: leave nothing behind
        lab.down()
        raise
    return lab


def bird_pair(name: str, family: int, sender_extra: str) -> tuple[Lab, Bird, str]:
    """The reference for cases 2 and 3: a sending and a receiving BIRD, each in a
    namespace of its own on an underlay like ours (bridge, router addresses), eBGP
    between them with BIRD's defaults for hold time 9 s (keepalive 3 s) and graceful
    restart on (ours: hold time 9 s, keepalive 3 s, graceful restart 120 s). Returns
    the lab (to tear down), the sender and the receiver's namespace, with the session
    Established."""
    lab = Lab(name)
    lab.down()
    try:
        sender_ns, receiver_ns = bird_namespaces(lab)
        Bird(receiver_ns, lab.dir / "recv").start(bird_config(
            "10.99.0.11", 64512, [Neighbor("send", SENDER[family], 65100)], "tor",
            hold_time=9, local6="fd99::b"))
        sender = Bird(sender_ns, lab.dir / "send")
        sender.start(bird_config("10.99.0.250", 65100,
                                 [Neighbor("h1", RECEIVER[family], 64512)], "tor",
                                 hold_time=9, local6="fd99::fa") + sender_extra)
        wait_established(sender)
        return lab, sender, receiver_ns
    except BaseException:
        lab.down()
        raise


def single_routes(count: int, family: int, gateway: str) -> tuple[list[Prefix], str]:
    """`count` host routes (/32 or /128, like the blocks of case 2), each in a static
    protocol of its own that starts disabled: `birdc enable tN` announces one."""
    routes = [Prefix.parse(f"fd64::{i + 1:x}/128" if family == 6
                           else f"10.64.{(i + 1) // 256}.{(i + 1) % 256}/32")
              for i in range(count)]
    config = "".join(f"protocol static t{i} {{\n  disabled;\n  ipv{family};\n"
                     f"  route {route} via {gateway};\n}}\n"
                     for i, route in enumerate(routes))
    return routes, config


def block_latency(trials: int, family: int = 4) -> tuple[list[float], list[float]]:
    """Ours and the reference's latencies, trial by trial in turn (machine noise hits
    both alike); both labs are up for the whole case."""
    lab = make_lab("l3bblk", 2, [], block_size=128 if family == 6 else 32, family=family)
    try:
        gateway = lab.router6 if family == 6 else lab.router
        routes, statics = single_routes(trials, family, gateway)
        ref_lab, sender, ref_receiver = bird_pair("l3bblkref", family, statics)
        try:
            receiver = lab.state.hosts["h2"].netns
            watcher = RouteWatcher([receiver])
            ref_watcher = RouteWatcher([ref_receiver], protocol=BIRD_PROTOCOL)
            store = lab.store()
            ipam = Ipam(store)
            latencies, reference = [], []
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
                started = time.monotonic()
                sender.cli("enable", f"t{trial}")  # birdc's own start-up is on the clock
                arrived = ref_watcher.wait(routes[trial], [ref_receiver], timeout=10)
                if arrived is None:
                    raise SystemExit(f"{routes[trial]} never reached the receiving BIRD")
                reference.append(arrived[ref_receiver] - started)
                time.sleep(0.05)
            store.close()
            watcher.close()
            ref_watcher.close()
            return latencies, reference
        finally:
            ref_lab.down()
    finally:
        lab.down()


def dead_reference(hold_time: int = 9) -> float:
    """BIRD -> BIRD: the sender's underlay link down, then the sender killed (as
    Lab.kill_host does to a host), until the receiving BIRD's kernel lost the route."""
    route = Prefix.parse("10.64.200.0/26")
    lab, sender, receiver = bird_pair(
        "l3bdeadref", 4, f"protocol static lost {{\n  ipv4;\n  route {route} via "
        f"10.99.0.254;\n}}\n")  # the underlay's router
    try:
        watcher = RouteWatcher([receiver], protocol=BIRD_PROTOCOL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "-n", receiver, "route", "show", str(route)],
                              capture_output=True, text=True).stdout:
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"{route} never reached the receiving BIRD")
        started = time.monotonic()
        subprocess.run(["ip", "-n", lab.net_ns, "link", "set", "p-send", "down"], check=True)
        for pid in netns.pids(sender.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        gone = watcher.wait(route, [receiver], deleted=True, timeout=60)
        watcher.close()
        return gone[receiver] - started if gone else float("nan")
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


def idle_peers(lab: Lab, peers: int, neighbor: str, neighbor_asn: int) -> list[int]:
    """`peers` BIRDs, each in a namespace of its own with one session (hold time 9 s,
    keepalive 3 s, exporting nothing) to `neighbor`."""
    pids = []
    for index in range(peers):
        address = f"10.99.0.{100 + index}"
        ns = f"{lab.name}-p{index}"
        netns.create(ns)
        lab.plug(ns, f"p-i{index}", address)
        bird = Bird(ns, lab.dir / f"peer{index}")
        pids.append(bird.start(
            f"router id {address};\nprotocol device {{}}\nprotocol bgp p {{ local "
            f"{address} as {65100 + index}; neighbor {neighbor} as {neighbor_asn}; "
            "hold time 9; ipv4 { import all; export none; }; }\n"))
    return pids


@dataclass
class Idle:
    ours: float  # % of a core, agent + ExaBGP
    reference: float  # % of a core, the one BIRD holding as many sessions
    by_process: dict[str, float]
    etcd: float  # our side's etcd over the same window (not counted in `ours`)
    profile: list[str]


def idle(peers: int = 40, settle: float = 20.0, window: float = 60.0,
         profile: Path | None = None) -> Idle:
    """One agent with `peers` BGP sessions (each to a BIRD of its own, in its own
    namespace: one BIRD holding sessions to one neighbour from many local addresses
    matched every incoming connection to its first session), at rest: CPU of agent +
    ExaBGP over `window` seconds, in % of a core. Reference, same window (both labs up
    at once): one BIRD with `peers` sessions to the same kind of peers, same timers."""
    lab = make_lab("l3bidle", 1, [])
    ref_lab = Lab("l3bidleref")
    try:
        host = lab.state.hosts["h1"]
        store = lab.store()
        for index in range(peers):
            spec = PeerSpec(f"idle{index}", f"10.99.0.{100 + index}", 65100 + index)
            store.put(keys.bgp_peer(spec.name), spec.to_record())
        store.close()
        idle_peers(lab, peers, host.ipv4, 64512)
        ref_lab.down()
        ref_lab.create_underlay(families=(4,))
        hub_ns = f"{ref_lab.name}-hub"
        netns.create(hub_ns)
        ref_lab.plug(hub_ns, "p-hub", "10.99.0.11")
        hub = Bird(hub_ns, ref_lab.dir / "hub")
        hub_pid = hub.start(bird_config(
            "10.99.0.11", 64512,
            [Neighbor(f"p{i}", f"10.99.0.{100 + i}", 65100 + i) for i in range(peers)],
            "tor", hold_time=9))
        idle_peers(ref_lab, peers, "10.99.0.11", 64512)
        deadline = time.monotonic() + 120
        while True:
            states = [p["state"] for p in lab.call("h1", "status")["peers"]]
            hub_up = hub.cli("show", "protocols").count("Established")
            if len(states) == peers and all(s == "Established" for s in states) \
                    and hub_up == peers:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"idle: sessions not Established: ours {states}; "
                                 f"the reference BIRD {hub_up} of {peers}")
            time.sleep(1)
        time.sleep(settle)
        agent_pid = lab.refresh().hosts["h1"].agent_pid
        ours = Usage(descendants(agent_pid))
        reference = Usage([hub_pid])
        etcd = Usage([lab.state.etcd_pid] if lab.state.etcd_pid else [])
        before = ours.by_process(), reference.cpu(), etcd.cpu()
        time.sleep(window)
        after = ours.by_process(), reference.cpu(), etcd.cpu()
        by_process = {n: 100 * (after[0][n] - before[0].get(n, 0.0)) / window
                      for n in after[0]}
        summary = []
        if profile is not None:  # after the measured window: py-spy's cost is not in it
            summary = profile_idle(profile, agent_pid,
                                   lab.call("h1", "status")["bgp_process"]["pid"], window)
        return Idle(sum(by_process.values()), 100 * (after[1] - before[1]) / window,
                    by_process, 100 * (after[2] - before[2]) / window, summary)
    finally:
        ref_lab.down()
        lab.down()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of a process."""
    return {int(task.name): cpu_seconds_of(task / "stat")
            for task in Path(f"/proc/{pid}/task").iterdir()}


def cpu_seconds_of(stat: Path) -> float:
    with contextlib.suppress(OSError):
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def profile_idle(profile: Path, agent_pid: int, exabgp_pid: int, duration: float
                 ) -> list[str]:
    """py-spy on agent and ExaBGP at rest, and the top frames of each: by function on
    top of the stack, and inclusive. `--nonblocking`: py-spy does not stop the process
    to sample it; stopping the agent's 20-odd threads 100 times a second raised its CPU
    from 0.3% to 3.6% at rest, and made py-spy count threads waiting in Condition.wait
    as active (so did `--gil`, which instead lost most samples). Beside the samples, each
    thread's CPU over the same seconds from /proc, which does not depend on py-spy."""
    profile.mkdir(parents=True, exist_ok=True)
    pids = {"agent": agent_pid, "exabgp": exabgp_pid}
    before = {name: thread_cpu(pid) for name, pid in pids.items()}
    recorders = [subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
         "--threads", "--nonblocking", "--format", "raw", "--rate", "100", "--duration",
         str(int(duration)), "--output", str(profile / f"idle-{name}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for name, pid in pids.items()]
    for recorder in recorders:
        _, err = recorder.communicate(timeout=duration + 60)
        if recorder.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace').strip()}")
    after = {name: thread_cpu(pid) for name, pid in pids.items()}
    lines = [f"py-spy --nonblocking, {duration:.0f} s at rest right after the measured window, "
             "100 Hz; threads' CPU from /proc over the same seconds"]
    for name in ("exabgp", "agent"):
        raw = profile / f"idle-{name}.txt"
        names = dict(re.findall(r"^thread \((\d+)\): ([^;]*);", raw.read_text(), re.M))
        spent = sorted(((after[name][tid] - before[name].get(tid, 0.0), tid)
                        for tid in after[name]), reverse=True)
        total = sum(cpu for cpu, _ in spent)
        lines.append(f"{name}: {100 * total / duration:.2f}% of a core; by thread: "
                     + ", ".join(f"{names.get(str(tid), tid)} "
                                 f"{100 * cpu / duration:.2f}%"
                                 for cpu, tid in spent[:6] if cpu > 0))
        for leaf, what in ((True, "self (function on top of the stack)"),
                           (False, "inclusive")):
            lines.append(f"{name}, {what}:")
            lines += ["  " + line for line in summarise([raw], r".", 12, leaf)]
    (profile / "idle-summary.txt").write_text("\n".join(lines) + "\n")
    return lines


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
    parser.add_argument("--idle-window", type=float, default=60.0,
                        help="seconds case 4 measures (and profiles) at rest")
    parser.add_argument("--family", choices=("4", "6", "both"), default="both",
                        help="IPv4, IPv6 or both (default both)")
    parser.add_argument("--profile", type=Path,
                        help="record the agent and ExaBGP with py-spy during each bulk run, and "
                        "at rest after case 4's window (idle-*.txt, idle-summary.txt), "
                        "into DIR")
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
            latencies, reference = block_latency(args.trials, family)
            ours50, ours99 = statistics.median(latencies), pct(latencies, 0.99)
            ref50, ref99 = statistics.median(reference), pct(reference, 0.99)
            print(f"2. IPv{family}: new route on A until in B's kernel ({len(latencies)} "
                  f"trials, alternating): new block, agent->ExaBGP->ExaBGP->agent p50 "
                  f"{1000 * ours50:.0f} ms, p99 {1000 * ours99:.0f} ms; `birdc enable` of a "
                  f"one-route static protocol, BIRD->BIRD p50 {1000 * ref50:.0f} ms, p99 "
                  f"{1000 * ref99:.0f} ms; ratio p50 {ours50 / ref50:.2f}, p99 "
                  f"{ours99 / ref99:.2f} (goal p50 < 100 ms)")
    if "dead" not in args.skip:
        reference_gone = dead_reference()
        gone = dead_host()
        print(f"3. host killed until its routes are gone elsewhere (hold time 9 s, "
              f"keepalive 3 s, one trial each): ours {gone:.1f}s, BIRD->BIRD "
              f"{reference_gone:.1f}s; ratio {gone / reference_gone:.2f}")
    if "idle" not in args.skip:
        profile = args.profile if args.profile else None
        result = idle(args.idle_peers, window=args.idle_window, profile=profile)
        parts = ", ".join(f"{k} {v:.2f}%" for k, v in sorted(result.by_process.items()))
        tick = 100 / TICK / args.idle_window  # one clock tick over the window, in %
        if result.reference > 0:
            versus = f"ratio {result.ours / result.reference:.1f}"
        else:  # /proc counts CPU in ticks: BIRD spent less than one
            versus = (f"BIRD under one clock tick (< {tick:.3f}%): ratio > "
                      f"{result.ours / tick:.0f}")
        print(f"4. at rest with {args.idle_peers} BGP sessions (hold time 9 s, keepalive "
              f"3 s), same {args.idle_window:.0f} s window: agent + ExaBGP "
              f"{result.ours:.2f}% of a core ({parts}; goal < 1%); one BIRD holding "
              f"{args.idle_peers} sessions to the same kind of peers "
              f"{result.reference:.3f}%; {versus}; our etcd, not counted, "
              f"{result.etcd:.2f}%")
        for line in result.profile:
            print(f"   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
