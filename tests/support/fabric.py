"""Helpers for tests that run a lab: kernel tables, waiting, agent status."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
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
