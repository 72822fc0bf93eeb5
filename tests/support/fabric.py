"""Helpers for tests that run a lab: kernel tables, waiting, agent status."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fabric import sockets
from fabric.lab.topology import Lab


def kernel_routes(ns: str, protocol: int = 73, family: int = 4) -> dict[str, str]:
    """prefix -> what the kernel does with it ("via A B", "blackhole", "dev X"), for the
    routes of one family."""
    out = subprocess.run(["ip", "-n", ns, f"-{family}", "route", "show", "proto",
                          str(protocol)], capture_output=True, text=True, check=True).stdout
    host = 128 if family == 6 else 32
    routes: dict[str, str] = {}
    lines = out.splitlines()
    index = 0
    while index < len(lines):
        words = lines[index].split()
        index += 1
        if words[0] == "blackhole":
            routes[words[1]] = "blackhole"
            continue
        prefix = words[0] if "/" in words[0] else f"{words[0]}/{host}"
        if "via" in words:
            routes[prefix] = "via " + words[words.index("via") + 1]
        elif "dev" in words and "nexthop" not in lines[index:index + 1]:
            routes[prefix] = "dev " + words[words.index("dev") + 1]
        hops = []
        while index < len(lines) and lines[index].strip().startswith("nexthop"):
            hop = lines[index].split()
            hops.append(hop[hop.index("via") + 1])
            index += 1
        if hops:
            routes[prefix] = "via " + " ".join(sorted(hops))
    return routes


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what} (last: {last})")


def status(lab: Lab, host: str) -> dict[str, Any]:
    return lab.call(host, "status")


def agent(lab: Lab, host: str, method: str, **params: Any) -> Any:
    return lab.call(host, method, **params)


def blocks_of(lab: Lab) -> dict[str, str]:
    """block cidr -> owning host (from etcd)."""
    from ipam.allocator import Ipam

    store = lab.store()
    try:
        return {b.cidr: b.affinity for b in Ipam(store).blocks() if b.affinity}
    finally:
        store.close()


def sessions_established(lab: Lab, host: str) -> bool:
    try:
        peers = status(lab, host)["peers"]
    except (sockets.AgentUnreachable, sockets.AgentError):
        return False
    return bool(peers) and all(p["state"] == "Established" for p in peers)


@dataclass
class Loss:
    """What a ping run saw: every echo sent, and the sequence numbers never answered."""

    sent: int = 0
    unanswered: list[int] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return len(self.unanswered)


IN_FLIGHT = 1.0  # s: echoes sent this close to the end may still be on their way


@contextlib.contextmanager
def pinging(lab: Lab, source: str, target: str, interval: float = 0.05) -> Iterator[Loss]:
    """Ping `target`'s first address from `source` every `interval` while the body runs.

    Counts per sequence number rather than ping's summary: the summary counts an echo
    sent just before the interrupt as lost, which on a loaded machine made a clean run
    look like a dropped packet. Echoes sent in the last IN_FLIGHT seconds are not judged;
    the body's own echoes are at least 1.5 s older than that. It starts once `target`
    answers at all.
    """
    loss = Loss()
    src, dst = lab.state.workloads[source], lab.state.workloads[target]
    # A workload just added may not be routed everywhere yet: that is not the body's loss.
    wait_until(lambda: lab.ping(src.netns, dst.ips[0]), f"{source} reaches {target}", 20)
    process = subprocess.Popen(["ip", "netns", "exec", src.netns, "ping", "-n", "-i",
                                str(interval), dst.ips[0]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        yield loss
    finally:
        time.sleep(1.5 + IN_FLIGHT)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
        match = re.search(r"(\d+) packets transmitted", out)
        assert match, out
        answered = {int(m) for m in re.findall(r"bytes from .*icmp_seq=(\d+)", out)}
        loss.sent = int(match[1])
        judged = loss.sent - int(IN_FLIGHT / interval)
        loss.unanswered = [seq for seq in range(1, judged + 1) if seq not in answered]
