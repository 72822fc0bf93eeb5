"""A live copy of everything under an etcd prefix: list once, then follow a watch.

The agent reacts to etcd (nodes joining, blocks claimed, peers configured) through
these mirrors. When the watch breaks (etcd restarted, compacted, unreachable) the
mirror lists again and carries on from the new revision; the callback always sees
the complete current contents, so consumers stay pure functions of a snapshot.

A value that cannot be read (not JSON, another schema version) does not delete its
key from the copy: the last readable value stays, and the key is passed on as
unreadable with the reason, so a consumer can say so rather than act as if the
record (a node, a block) had gone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from fabric import logs
from fabric.store.datastore import Datastore
from fabric.store.errors import DatastoreError

Snapshot = dict[str, dict[str, Any]]
Unreadable = dict[str, str]  # key -> why its value cannot be read


class Mirror:
    def __init__(self, store: Datastore, prefix: str,
                 on_change: Callable[[Snapshot, Unreadable], None], name: str) -> None:
        self.store = store
        self.prefix = prefix
        self.on_change = on_change
        self.name = name
        self.log = logs.get("watch", mirror=name)
        self._data: Snapshot = {}
        self._unreadable: Unreadable = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cancel: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set after the first complete listing
        self.errors = 0

    def snapshot(self) -> Snapshot:
        with self._lock:
            return dict(self._data)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        if self._cancel:
            with contextlib.suppress(Exception):  # the watch may be broken already
                self._cancel()
        if self._thread:
            self._thread.join(timeout=5)

    def _publish(self) -> None:
        with self._lock:
            data, unreadable = dict(self._data), dict(self._unreadable)
        try:
            self.on_change(data, unreadable)
        except Exception:
            self.log.exception("mirror consumer failed")

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                listing = self.store.list(self.prefix)
                with self._lock:
                    data = {e.key: e.value for e in listing.entries}
                    for bad in listing.corrupt:  # keep what we could read before
                        if bad.key in self._data:
                            data[bad.key] = self._data[bad.key]
                    self._data = data
                    self._unreadable = {bad.key: bad.reason for bad in listing.corrupt}
                for bad in listing.corrupt:
                    self.log.error("unreadable record", key=bad.key, reason=bad.reason)
                self._publish()
                self.ready.set()
                batches, self._cancel = self.store.watch_prefix(
                    self.prefix, start_revision=listing.revision + 1)
                backoff = 0.2
                for batch in batches:
                    if self._stop.is_set():
                        return
                    with self._lock:
                        for event in batch:
                            if event.error is not None:
                                self.log.error("unreadable record", key=event.key,
                                               reason=event.error.reason)
                                self._unreadable[event.key] = event.error.reason
                            elif event.value is None:
                                self._data.pop(event.key, None)
                                self._unreadable.pop(event.key, None)
                            else:
                                self._data[event.key] = event.value
                                self._unreadable.pop(event.key, None)
                    self._publish()
            except DatastoreError as exc:
                self.errors += 1
                if not self._stop.is_set():
                    self.log.warning("watch broken; listing again", error=str(exc))
            except Exception:
                self.errors += 1
                self.log.exception("watch failed; listing again")
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
