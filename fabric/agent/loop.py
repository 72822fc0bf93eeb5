"""The owner loop: the one thread that reads and writes the agent's state.

Every input is a message in one queue, handled in arrival order by
`AgentState.handle`; deadlines (graceful-restart expiry, hold-downs, periodic jobs)
are checked after each message and whenever the queue stays quiet until the next one.
The jobs each step returns go to the adapters in the order they were decided:
`dispatch` only queues them (kernel writer, ExaBGP speaker, job workers), it never
waits, so a slow etcd or kernel never stalls the loop.

Requests that need an answer (a CNI ADD's routes, a control query) carry a Future;
the caller waits on it, not on a lock. Nothing else is shared: the adapters report
back with messages.

A mirror's snapshots do not queue up: `snapshots(name)` gives the mirror a poster
that keeps only the newest one waiting, and the loop takes it when it gets there. A
burst of etcd changes is then one re-read, not one per change (each a full copy of
the prefix: with thousands of workloads, queued copies grew the agent by 150 MB and
made a status query wait seconds).

`beat` is when the loop last went round; a loop stuck for long is a failed health
check (`fabric.agent.service`), and the agent exits so that its supervisor restarts it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

from fabric import logs
from fabric.agent import messages as m
from fabric.agent.clock import Clock
from fabric.agent.state import AgentState

T = TypeVar("T")
MAX_WAIT = 1.0  # seconds; the loop beats at least this often


class OwnerLoop:
    def __init__(self, state: AgentState, clock: Clock,
                 dispatch: Callable[[m.Job], None]) -> None:
        self.state = state
        self.clock = clock
        self.dispatch = dispatch
        self.log = logs.get("agent.loop", node=state.me.name)
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.beat = clock.monotonic()

    # -- any thread --------------------------------------------------------------------
    def post(self, message: object) -> None:
        self.inbox.put(message)

    def ask(self, read: Callable[[AgentState], T], timeout: float = 30.0) -> T:
        """Run `read(state)` on the loop and return its result."""
        reply: Future[T] = Future()
        self.post(m.Query(read, reply))
        return reply.result(timeout)

    def stop(self) -> None:
        self.post(m.Stop())

    def snapshots(self, name: str) -> Callable[[Mapping[str, Any], Mapping[str, str]], None]:
        """A poster for mirror `name` that keeps only its newest snapshot waiting."""
        return _Newest(self, name)

    # -- the loop's own thread ---------------------------------------------------------
    def run(self) -> None:
        while True:
            wait = self.state.next_deadline() - self.clock.monotonic()
            try:
                message = self.inbox.get(timeout=min(max(wait, 0.0), MAX_WAIT))
            except queue.Empty:
                message = None
            self.beat = self.clock.monotonic()
            if isinstance(message, m.Stop):
                return
            self.step(message)

    def step(self, message: object | None) -> None:
        """Handle one message (or none), then the deadlines that passed; dispatch jobs."""
        jobs: list[m.Job] = []
        try:
            if isinstance(message, m.Query):
                _answer(message, self.state)
            elif isinstance(message, _Ready):
                jobs = self.state.handle(message.box.take())
            elif message is not None:
                jobs = self.state.handle(message)
            if self.clock.monotonic() >= self.state.next_deadline():
                jobs += self.state.tick()
        except Exception as exc:
            self.log.exception("handling a message failed", message=type(message).__name__)
            reply = getattr(message, "reply", None)
            if isinstance(reply, Future) and not reply.done():
                reply.set_exception(exc)
        for job in jobs:
            try:
                self.dispatch(job)
            except Exception as exc:
                self.log.exception("dispatching a job failed", job=type(job).__name__)
                reply = getattr(job, "reply", None)
                if isinstance(reply, Future) and not reply.done():
                    reply.set_exception(exc)


class _Newest:
    """One mirror's newest snapshot, waiting for the loop (only a token is queued)."""

    def __init__(self, loop: OwnerLoop, name: str) -> None:
        self.loop, self.name = loop, name
        self._lock = threading.Lock()
        self._waiting: m.Snapshot | None = None

    def __call__(self, records: Mapping[str, Any], unreadable: Mapping[str, str]) -> None:
        with self._lock:
            queued = self._waiting is not None
            self._waiting = m.Snapshot(self.name, records, unreadable)
        if not queued:
            self.loop.post(_Ready(self))

    def take(self) -> m.Snapshot:
        with self._lock:
            snapshot, self._waiting = self._waiting, None
        assert snapshot is not None
        return snapshot


class _Ready:
    def __init__(self, box: _Newest) -> None:
        self.box = box


def _answer(query: m.Query, state: AgentState) -> None:
    try:
        result: Any = query.read(state)
    except Exception as exc:
        query.reply.set_exception(exc)
        return
    query.reply.set_result(result)
