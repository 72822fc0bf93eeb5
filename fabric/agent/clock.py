"""Time, injected: the agent's timers run on a clock the tests can move by hand.

Graceful-restart expiry, max-prefix hold-downs, the release of taken-over routes and
every periodic job are deadlines on this clock. The agent uses `SystemClock`; unit
tests use `FakeClock` and `advance()` it, so a 120-second restart window is tested in
no time and without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: deadlines are kept on it."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch: only for what people read ("since")."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._now = start
        self._offset = wall - start

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._offset

    def advance(self, seconds: float) -> None:
        self._now += seconds
