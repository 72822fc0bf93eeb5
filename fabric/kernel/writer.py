"""The only writer of our routes: applies batches in the order decided, repairs drift.

The agent's owner loop decides what the kernel should hold (`fabric.agent.desired`)
and hands this writer batches; one thread applies them first in, first out, so the
kernel sees the decisions in the order they were made. The writer remembers what it
installed and what the kernel refused, and reports each batch back.

Resync (shaped like Calico Felix's route table): the loop sends the whole desired set
as one more job in the same queue, so the dump it is compared with comes after every
earlier batch and before every later one; no write of ours can be in flight. Any
difference left is somebody else's doing, and only that is reported as drift; a
route the kernel refused earlier is retried, not called drift.

Other kernel jobs that must keep their place among the route batches (the network
policy table: a workload's rules go in before its route) run in the same queue
(`call`). A batch may be guarded by such a job's outcome: an ADD's route is installed
only if its workload's rules were.

A second thread listens to netlink route events and reports those not caused by our
own socket, so a route deleted by hand comes back within a moment.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fabric import logs
from fabric.kernel import netlink
from fabric.kernel.netlink import RouteSocket
from fabric.kernel.routes import (
    Applied,
    Drift,
    EventsLost,
    Failure,
    Resynced,
    Route,
    RouteEvent,
    diff,
)
from fabric.model.prefix import Prefix

Report = Callable[[object], None]


@dataclass(frozen=True)
class _Apply:
    replace: tuple[Route, ...]
    delete: tuple[Prefix, ...]
    reply: Future[list[Failure]] | None = field(default=None, compare=False)
    guard: Future[Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class _Call:
    work: Callable[[], None]


@dataclass(frozen=True)
class _Resync:
    desired: Mapping[Prefix, Route]
    keep: frozenset[Prefix]


class KernelWriter:
    def __init__(self, protocol: int, report: Report) -> None:
        self.protocol = protocol
        self.report = report
        self.log = logs.get("kernel.writer", protocol=protocol)
        self._sock = RouteSocket(protocol)
        self.portid: int = self._sock.sock.getsockname()[0]
        self._installed: dict[Prefix, Route] = {}
        self._failed: set[Prefix] = set()
        self._jobs: queue.SimpleQueue[_Apply | _Resync | _Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # -- before start ------------------------------------------------------------------
    def take_over(self) -> list[Route]:
        """The routes a previous run left: believed installed from now on."""
        found = self._sock.dump()
        self._installed = {r.prefix: r for r in found}
        self.log.info("took over kernel routes", routes=len(found))
        return found

    # -- jobs (any thread) -------------------------------------------------------------
    def apply(self, replace: Iterable[Route], delete: Iterable[Prefix],
              reply: Future[list[Failure]] | None = None,
              guard: Future[Any] | None = None) -> None:
        """`guard`: a Future completed by an earlier job in this queue; unless it holds
        a result whose `ok` is true, `replace` is not installed (refused: ECANCELED)."""
        self._jobs.put(_Apply(tuple(replace), tuple(delete), reply, guard))

    def call(self, work: Callable[[], None]) -> None:
        """Run `work` on the writer's thread, in order with the batches."""
        self._jobs.put(_Call(work))

    def resync(self, desired: Mapping[Prefix, Route], keep: frozenset[Prefix]) -> None:
        self._jobs.put(_Resync(desired, keep))

    # -- threads -----------------------------------------------------------------------
    def start(self) -> list[threading.Thread]:
        for target, name in ((self._run, "kernel-writer"), (self._listen, "route-events")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return list(self._threads)

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            try:
                if isinstance(job, _Apply):
                    self._apply(job)
                elif isinstance(job, _Call):
                    job.work()
                else:
                    self._resync(job)
            except Exception as exc:  # a bad moment must not end the writer for good
                self.log.exception("kernel job failed")
                if isinstance(job, _Apply):
                    if job.reply is not None and not job.reply.done():
                        job.reply.set_exception(exc)
                    self.report(Applied(0, (), 0.0))
                elif isinstance(job, _Call):
                    continue
                else:
                    self.report(Resynced((), 0, (), 0.0))

    # -- work (writer thread only) -----------------------------------------------------
    def _apply(self, job: _Apply) -> None:
        started = time.perf_counter()
        replace = [r for r in job.replace
                   if self._installed.get(r.prefix) != r or r.prefix in self._failed]
        delete = [self._installed[p] for p in job.delete if p in self._installed]
        refused: list[Failure] = []
        if job.guard is not None and not _succeeded(job.guard):
            refused = [Failure(r, False, errno.ECANCELED) for r in replace]
            self._failed |= {r.prefix for r in replace}
            replace = []
        failures = self._send(replace, delete) + refused
        if job.reply is not None:
            job.reply.set_result(failures)
        # Reported even when nothing needed writing: the owner loop counts the batches
        # still in flight, and holds its periodic resync back while there are any.
        written = len(replace) + len(delete) - (len(failures) - len(refused))
        self.report(Applied(written, tuple(failures),
                            time.perf_counter() - started))

    def _send(self, replace: list[Route], delete: list[Route]) -> list[Failure]:
        if not replace and not delete:
            return []
        failures = self._sock.apply(replace, delete)
        failed = {(f.route.prefix, f.delete) for f in failures}
        for route in delete:
            if (route.prefix, True) not in failed:
                self._installed.pop(route.prefix, None)
                self._failed.discard(route.prefix)
        for route in replace:
            if (route.prefix, False) not in failed:
                self._installed[route.prefix] = route
                self._failed.discard(route.prefix)
        self._failed |= {f.route.prefix for f in failures}
        for failure in failures[:10]:
            self.log.warning("kernel refused a route", prefix=str(failure.route.prefix),
                             error=str(failure))
        return failures

    def _resync(self, job: _Resync) -> None:
        started = time.perf_counter()
        actual = {r.prefix: r for r in self._sock.dump()}
        change = diff(job.desired, actual, keep=job.keep)
        now = time.time()
        drift: list[Drift] = []
        for route in change.replace:
            if route.prefix in self._failed:
                continue  # we know: the kernel refused it; retried below
            have = actual.get(route.prefix)
            drift.append(Drift(now, str(route.prefix),
                               have.describe() if have else "missing", route.describe()))
        for route in change.delete:
            if route.prefix not in self._installed and route.prefix not in self._failed:
                drift.append(Drift(now, str(route.prefix), route.describe(), "nothing"))
        self._installed = actual
        failures = self._send(change.replace, change.delete)
        repaired = len(change.replace) + len(change.delete) - len(failures)
        if change:
            self.log.info("resync repairs kernel", replace=len(change.replace),
                          delete=len(change.delete), drift=len(drift))
        self.report(Resynced(tuple(drift), repaired, tuple(failures),
                             time.perf_counter() - started))

    def _listen(self) -> None:
        """Route events from others (not our own socket), reported to the owner loop."""
        sock = RouteSocket(self.protocol,
                           groups=netlink.RTMGRP_IPV4_ROUTE | netlink.RTMGRP_IPV6_ROUTE)
        sock.ignore_sender(self.portid)
        try:
            while not self._stop.is_set():
                for msg in sock.events(timeout=1.0, skip_pid=self.portid):
                    if msg.type == netlink.NLMSG_ERROR:  # overflow: we missed some
                        self.report(EventsLost())
                        break
                    event = netlink.route_event(msg, self.protocol)
                    if event is not None:
                        self.report(RouteEvent(*event))
        except Exception:
            if not self._stop.is_set():
                self.log.exception("route event listener failed")
                raise
        finally:
            sock.close()


def _succeeded(guard: Future[Any]) -> bool:
    if not guard.done() or guard.exception() is not None:
        return False
    return bool(getattr(guard.result(), "ok", False))
