"""Job workers: slow I/O the owner loop asks for, run beside it, reported back.

Each worker is one thread taking jobs first in, first out, so jobs of one kind keep
their order (an etcd write decided before another is made before it). A job that
fails is reported as such (`JobDone.error`); it never ends the worker.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from fabric import logs
from fabric.agent.messages import JobDone

Task = Callable[[], Mapping[str, Any] | None]


class Worker:
    def __init__(self, name: str, report: Callable[[object], None]) -> None:
        self.name = name
        self.report = report
        self.log = logs.get("agent.worker", worker=name)
        self._jobs: queue.SimpleQueue[tuple[str, Task] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, kind: str, task: Task) -> None:
        self._jobs.put((kind, task))

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            kind, task = item
            try:
                result = task() or {}
            except Exception as exc:
                self.log.warning("job failed", job=kind, error=str(exc) or type(exc).__name__)
                self.report(JobDone(kind, error=str(exc) or type(exc).__name__))
                continue
            self.report(JobDone(kind, result=result))
