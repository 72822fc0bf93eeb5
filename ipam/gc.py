"""IPAM garbage collection, as the agent runs it on a timer.

A leak is freed only after it has been seen as a leak continuously for a grace period
(default 10 minutes): an allocation briefly precedes its workload registration while
a container is being created. Even then it is not freed while the workload's network
namespace still exists, and the release itself compares that no registration
appeared. Empty blocks of nodes that left the fabric are given back too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fabric import logs
from ipam.allocator import Ipam
from ipam.check import check, dead_nodes, leaked_handles

DEFAULT_GRACE = 600.0


@dataclass
class LeakTracker:
    """Remembers since when each handle has been seen leaked (pure)."""

    grace: float = DEFAULT_GRACE
    first_seen: dict[str, float] = field(default_factory=dict)

    def observe(self, leaked: Iterable[str], now: float) -> list[str]:
        """Record this round's leaks; return those leaked for at least `grace`.

        A handle that is not leaked this round is forgotten, so a leak must be seen
        without interruption for the whole grace period.
        """
        current = set(leaked)
        self.first_seen = {h: self.first_seen.get(h, now) for h in current}
        return sorted(h for h, since in self.first_seen.items() if now - since >= self.grace)

    def forget(self, handle: str) -> None:
        self.first_seen.pop(handle, None)


@dataclass(frozen=True)
class GcResult:
    released: list[str]
    kept_netns_alive: list[str]
    blocks_freed: list[str]
    pending: int


def collect(ipam: Ipam, node: str, tracker: LeakTracker, *, now: float | None = None,
            netns_exists: Callable[[str], bool] = os.path.exists) -> GcResult:
    """One GC round for `node`'s own allocations, plus empty blocks of departed nodes."""
    now = time.time() if now is None else now
    snap = ipam.snapshot()
    report = check(snap)
    due = tracker.observe(leaked_handles(report, node), now)
    released, kept = [], []
    log = logs.get("ipam.gc", node=node)
    for handle in due:
        record = snap.handles[handle]
        netns = record.attrs.get("netns", "")
        if netns and netns_exists(netns):
            kept.append(handle)
            continue
        if ipam.release(handle, only_if_unregistered=True):
            released.append(handle)
            log.info("released leaked allocation", handle=handle,
                     addresses=[a.address for a in record.allocations])
        tracker.forget(handle)
    freed: list[str] = []
    for gone in sorted(dead_nodes(report)):
        freed += ipam.release_empty_blocks(gone)
    return GcResult(released, kept, freed, len(tracker.first_seen) - len(released))
