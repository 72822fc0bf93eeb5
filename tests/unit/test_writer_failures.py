"""The kernel writer reports every job, even one that failed: the owner loop waits for
that report before it asks for the next resync."""

from __future__ import annotations

import queue

from fabric.kernel.netlink import NetlinkError
from fabric.kernel.routes import Resynced
from fabric.kernel.writer import KernelWriter


def test_a_resync_whose_dump_fails_is_still_reported():
    reports: queue.SimpleQueue[object] = queue.SimpleQueue()
    writer = KernelWriter(73, reports.put)

    def busy(*_: object) -> list:
        raise NetlinkError(16, "route dump: Device or resource busy")

    writer._sock.dump = busy  # type: ignore[method-assign]
    writer.start()
    try:
        writer.resync({}, frozenset())
        while not isinstance(report := reports.get(timeout=5), Resynced):
            pass
        assert report == Resynced((), 0, (), 0.0)
    finally:
        writer.stop()
