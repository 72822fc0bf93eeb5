"""What the benchmarks share: CPU and memory of processes from /proc, percentiles, and
a watcher that timestamps route events in many namespaces at once."""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fabric.kernel import netlink, netns
from fabric.kernel.netns import entered
from fabric.model.prefix import Prefix

TICK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The q-quantile by rank (no interpolation: with 50 samples p99 is the maximum)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def process_name(pid: int) -> str:
    """`agent`, `exabgp`, `relay`, or the command's own name."""
    argv = b" ".join(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    for marker, name in ((b"fabric-agent", "agent"), (b"bgp.exabgp_run", "exabgp"),
                         (b"exabgp", "exabgp"), (b"bgp.relay", "relay")):
        if marker in argv:
            return name
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.index("(") + 1:stat.rindex(")")]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def memory_kb(pid: int) -> dict[str, int]:
    """rss (resident, shared pages counted in full), pss (shared pages divided among
    their users), uss (pages only this process has: what it alone adds), hwm (peak rss)."""
    found = {"rss": 0, "pss": 0, "uss": 0, "hwm": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found["rss"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                found["hwm"] = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                found["pss"] = int(value.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                found["uss"] += int(value.split()[0])
    return found


@dataclass
class Usage:
    """CPU seconds and memory of a set of processes, read from /proc."""

    pids: list[int]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def by_process(self) -> dict[str, float]:
        """CPU seconds so far per process name (agent, exabgp, bird...)."""
        found: dict[str, float] = {}
        for pid in self.pids:
            with contextlib.suppress(OSError):
                name = process_name(pid)
                found[name] = found.get(name, 0.0) + cpu_seconds(pid)
        return found

    def peak_rss_mb(self) -> float:
        return sum(memory_kb(pid)["hwm"] for pid in self.pids) / 1024


class RouteWatcher:
    """Timestamps of route events of one protocol, per namespace and prefix, read by
    one thread from a netlink socket subscribed in each namespace (no polling: the
    kernel tells us as it happens)."""

    def __init__(self, namespaces: list[str], protocol: int = 73) -> None:
        self.protocol = protocol
        self.added: dict[Prefix, dict[str, float]] = {}
        self.deleted: dict[Prefix, dict[str, float]] = {}
        self._selector = selectors.DefaultSelector()
        self._sockets: list[netlink.RouteSocket] = []
        groups = netlink.RTMGRP_IPV4_ROUTE | netlink.RTMGRP_IPV6_ROUTE
        for ns in namespaces:
            with entered(netns.path(ns)):
                sock = netlink.RouteSocket(protocol, groups=groups)
            self._sockets.append(sock)
            self._selector.register(sock.fileno(), selectors.EVENT_READ, (ns, sock))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.2):
                ns, sock = key.data
                now = time.monotonic()
                try:
                    messages = sock.events(timeout=0.0)
                except BlockingIOError:
                    continue
                for msg in messages:
                    event = netlink.route_event(msg, self.protocol)
                    if event is not None:
                        deleted, route = event
                        seen = self.deleted if deleted else self.added
                        seen.setdefault(route.prefix, {})[ns] = now

    def wait(self, prefix: Prefix, namespaces: list[str], deleted: bool = False,
             timeout: float = 60.0) -> dict[str, float] | None:
        """Times the prefix was added (deleted) in each namespace; None on timeout."""
        seen = self.deleted if deleted else self.added
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            times = seen.get(prefix, {})
            if all(ns in times for ns in namespaces):
                return {ns: times[ns] for ns in namespaces}
            time.sleep(0.002)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()
