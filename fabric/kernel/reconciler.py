"""Keeps the kernel's routes of our protocol equal to the desired set.

Shaped like Calico Felix's route table: the desired routes come from named sources
(learned BGP routes, blackholes for our own blocks, /32s to local workloads); the
reconciler applies changes incrementally as they come, and re-reads the kernel on a
timer and when a netlink event shows somebody else touched a route of ours, then
repairs the difference (a route deleted or changed by hand comes back). Routes of
other protocols are never read for changes, let alone touched.

After a restart the agent takes over the routes it finds (`take_over`): they stay in
the kernel, even though nothing wants them yet, until `release_stale` says the peers
that could confirm them have had their chance.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fabric import logs
from fabric.kernel import netlink
from fabric.kernel.netlink import Failure, RouteSocket
from fabric.kernel.routes import Route, diff
from fabric.model.prefix import Prefix

# Higher wins when two sources want the same prefix: a local workload's /32 beats
# anything learned, our own block's blackhole beats a learned copy of it.
SOURCES = ("learned", "blackholes", "workloads")
PRIORITY = {name: rank for rank, name in enumerate(SOURCES)}


@dataclass(frozen=True)
class Drift:
    """A repair: what the kernel had that it should not have had, and when."""

    at: float
    prefix: str
    found: str  # "missing", "unexpected" or the route the kernel held instead
    wanted: str

    def to_dict(self) -> dict[str, object]:
        return {"at": self.at, "prefix": self.prefix, "found": self.found,
                "wanted": self.wanted}


@dataclass
class Stats:
    applied: int = 0
    failures: int = 0
    resyncs: int = 0
    repaired: int = 0
    last_resync_seconds: float = 0.0
    last_apply_seconds: float = 0.0
    apply_seconds_total: float = 0.0


class Reconciler:
    def __init__(self, protocol: int, resync_interval: float = 10.0,
                 on_failure: Callable[[list[Failure]], None] | None = None) -> None:
        self.protocol = protocol
        self.resync_interval = resync_interval
        self.log = logs.get("kernel.reconciler", protocol=protocol)
        self._sock = RouteSocket(protocol)
        self._portid = self._sock.sock.getsockname()[0]
        self._sources: dict[str, dict[Prefix, Route]] = {s: {} for s in SOURCES}
        self._installed: dict[Prefix, Route] = {}
        self._dirty: set[Prefix] = set()
        self._stale: set[Prefix] = set()
        self._lock = threading.RLock()  # state
        self._kernel = threading.Lock()  # the command socket
        self._wake = threading.Event()
        self._resync_due = True
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.on_failure = on_failure
        self.stats = Stats()
        self.drift: collections.deque[Drift] = collections.deque(maxlen=100)
        self.failed: dict[Prefix, str] = {}

    # -- desired state -----------------------------------------------------------------
    def update(self, source: str, changes: Mapping[Prefix, Route | None]) -> None:
        """Set (or with None, drop) some of a source's routes; applied asynchronously."""
        self._record(source, changes)
        self._wake.set()

    def _record(self, source: str, changes: Mapping[Prefix, Route | None]) -> None:
        with self._lock:
            routes = self._sources[source]
            for prefix, route in changes.items():
                if route is None:
                    routes.pop(prefix, None)
                else:
                    routes[prefix] = route
            self._dirty.update(changes)

    def replace(self, source: str, routes: Mapping[Prefix, Route]) -> None:
        """Make a source's routes exactly `routes`."""
        with self._lock:
            old = self._sources[source]
            changes: dict[Prefix, Route | None] = {p: None for p in old if p not in routes}
            changes.update({p: r for p, r in routes.items() if old.get(p) != r})
        if changes:
            self.update(source, changes)

    def install_now(self, source: str, routes: Mapping[Prefix, Route | None]) -> list[Failure]:
        """Like `update`, but applied before returning (a CNI ADD needs its route now)."""
        self._record(source, routes)
        return self._apply_dirty(only=set(routes))

    def desired(self) -> dict[Prefix, Route]:
        with self._lock:
            return self._effective()

    def source(self, name: str) -> dict[Prefix, Route]:
        with self._lock:
            return dict(self._sources[name])

    def _effective(self) -> dict[Prefix, Route]:
        merged: dict[Prefix, Route] = {}
        for name in SOURCES:  # ascending priority: later sources overwrite
            merged.update(self._sources[name])
        return merged

    def _wanted(self, prefix: Prefix) -> Route | None:
        for name in reversed(SOURCES):
            route = self._sources[name].get(prefix)
            if route is not None:
                return route
        return None

    # -- restart -----------------------------------------------------------------------
    def take_over(self) -> int:
        """Adopt the routes a previous run left: keep them until `release_stale`."""
        with self._kernel:
            found = self._sock.dump()
        with self._lock:
            self._installed = {r.prefix: r for r in found}
            self._stale = set(self._installed)
        self.log.info("took over kernel routes", routes=len(found))
        return len(found)

    def stale(self) -> set[Prefix]:
        with self._lock:
            return {p for p in self._stale if self._wanted(p) is None}

    def release_stale(self, prefixes: Iterable[Prefix] | None = None) -> int:
        """Stop protecting taken-over routes (all, or some); undesired ones then go."""
        with self._lock:
            chosen = set(self._stale) if prefixes is None else set(prefixes) & self._stale
            self._stale -= chosen
            doomed = {p for p in chosen if self._wanted(p) is None}
            self._dirty |= doomed
        if doomed:
            self.log.info("releasing stale routes", routes=len(doomed))
            self._wake.set()
        return len(doomed)

    # -- applying ----------------------------------------------------------------------
    def _apply_dirty(self, only: set[Prefix] | None = None) -> list[Failure]:
        with self._lock:
            prefixes = self._dirty if only is None else (self._dirty & only)
            if only is None:
                self._dirty = set()
            else:
                self._dirty -= prefixes
            replace: list[Route] = []
            delete: list[Route] = []
            for prefix in prefixes:
                want = self._wanted(prefix)
                have = self._installed.get(prefix)
                if want is not None and want != have:
                    replace.append(want)
                elif want is None and have is not None and prefix not in self._stale:
                    delete.append(have)
        return self._send(replace, delete)

    def _send(self, replace: list[Route], delete: list[Route]) -> list[Failure]:
        if not replace and not delete:
            return []
        started = time.perf_counter()
        with self._kernel:
            failures = self._sock.apply(replace, delete)
        elapsed = time.perf_counter() - started
        failed = {(f.route.prefix, f.delete) for f in failures}
        with self._lock:
            for route in delete:
                if (route.prefix, True) not in failed:
                    self._installed.pop(route.prefix, None)
                    self.failed.pop(route.prefix, None)
            for route in replace:
                if (route.prefix, False) not in failed:
                    self._installed[route.prefix] = route
                    self.failed.pop(route.prefix, None)
            for failure in failures:
                self.failed[failure.route.prefix] = str(failure)
            self.stats.applied += len(replace) + len(delete) - len(failures)
            self.stats.failures += len(failures)
            self.stats.last_apply_seconds = elapsed
            self.stats.apply_seconds_total += elapsed
        for failure in failures[:10]:
            self.log.warning("kernel refused a route", prefix=str(failure.route.prefix),
                             error=str(failure))
        if failures and self.on_failure:
            self.on_failure(failures)
        return failures

    def resync(self) -> int:
        """Re-read the kernel, repair every difference; returns the number repaired."""
        started = time.perf_counter()
        with self._kernel:
            actual = {r.prefix: r for r in self._sock.dump()}
        with self._lock:
            wanted = self._effective()
            change = diff(wanted, actual, keep=self._stale)
            believed = self._installed
            # Differences we did not cause are drift; the rest is work still queued.
            now = time.time()
            for route in change.replace:
                if route.prefix in self._dirty or route.prefix in self.failed:
                    continue
                have = actual.get(route.prefix)
                if believed.get(route.prefix) == route or have is not None:
                    self.drift.append(Drift(now, str(route.prefix),
                                            have.describe() if have else "missing",
                                            route.describe()))
            for route in change.delete:
                if route.prefix not in self._dirty and route.prefix not in believed:
                    self.drift.append(Drift(now, str(route.prefix), route.describe(),
                                            "nothing"))
            self._installed = actual
            self._dirty -= {r.prefix for r in change.replace} | {r.prefix for r in change.delete}
        repaired = len(change.replace) + len(change.delete)
        if change:
            self.log.info("resync repairs kernel", replace=len(change.replace),
                          delete=len(change.delete))
        self._send(change.replace, change.delete)
        with self._lock:
            self.stats.resyncs += 1
            self.stats.repaired += repaired
            self.stats.last_resync_seconds = time.perf_counter() - started
        return repaired

    # -- threads -----------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._run, "reconciler"), (self._listen, "route-events")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def request_resync(self) -> None:
        self._resync_due = True
        self._wake.set()

    def _run(self) -> None:
        next_resync = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, next_resync - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._resync_due or time.monotonic() >= next_resync:
                    self._resync_due = False
                    self.resync()
                    next_resync = time.monotonic() + self.resync_interval
                else:
                    self._apply_dirty()
            except Exception:  # a bad moment must not end reconciliation for good
                self.log.exception("reconcile failed; retrying")
                self._stop.wait(1.0)
                self._resync_due = True

    def _listen(self) -> None:
        """Netlink route events from others (not our own socket) trigger a resync."""
        sock = RouteSocket(self.protocol,
                           groups=netlink.RTMGRP_IPV4_ROUTE | netlink.RTMGRP_IPV6_ROUTE)
        try:
            while not self._stop.is_set():
                messages = sock.events(timeout=1.0)
                for msg in messages:
                    if msg.type == netlink.NLMSG_ERROR:  # overflow: we missed some
                        self.request_resync()
                        break
                    if msg.pid == self._portid:
                        continue
                    event = netlink.route_event(msg, self.protocol)
                    if event is not None:
                        deleted, route = event
                        with self._lock:
                            wanted = self._wanted(route.prefix)
                        if (deleted and wanted is not None) or \
                                (not deleted and wanted != route):
                            self.log.info("route changed outside the agent",
                                          prefix=str(route.prefix), deleted=deleted)
                            self.request_resync()
                            break
        finally:
            sock.close()
