"""How the agent runs ExaBGP: ExaBGP's own main, with a reactor that rests when idle.

ExaBGP 5.0.15's reactor gives every peer a turn every `reactor.speed / 100` seconds
(10 ms by default) whether anything happened or not, so a node at rest spent 2.2% of
a core with 2 peers and 6.8% with 39 (measured here). A longer period cuts that, but
sending an UPDATE takes the peer several turns, each waiting out the period when it
has nothing to read: at 100 ms a new block took 250 ms to reach the next node
instead of 10 ms.

So the wait stays 10 ms while there is work, and grows to `IDLE_WAIT_MS` once
nothing has happened for `IDLE_AFTER` seconds. Nothing is lost by it: data from a peer
and commands from the agent wake ExaBGP's poll at once (their descriptors are in it),
and BGP's own timers are seconds (keepalive every 3 s for a hold time of 9 s).

This wraps one method of a pinned release (`exabgp==5.0.15`); if it is not there, ExaBGP
runs unchanged and says so on stderr (the agent keeps that in exabgp.log).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

IDLE_AFTER = 1.0  # seconds without work before resting
IDLE_WAIT_MS = 500  # ExaBGP's poll timeout while resting


def rest_when_idle(reactor_class: Any, clock: Callable[[], float] = time.monotonic) -> bool:
    """Wrap `reactor_class._wait_for_io`; False when the method is not there."""
    original = getattr(reactor_class, "_wait_for_io", None)
    if original is None or getattr(original, "_l3fabric", False):
        return original is not None

    def _wait_for_io(self: Any, sleeptime: int) -> Iterator[int]:
        now = clock()
        last = getattr(self, "_l3fabric_busy", now)
        if sleeptime == 0:
            self._l3fabric_busy = now
        elif now - last > IDLE_AFTER:
            sleeptime = max(sleeptime, IDLE_WAIT_MS)
        woke = False
        for fd in original(self, sleeptime):
            woke = True
            yield fd
        if woke:
            self._l3fabric_busy = clock()

    _wait_for_io._l3fabric = True  # type: ignore[attr-defined]
    reactor_class._wait_for_io = _wait_for_io
    return True


def main() -> int:
    from exabgp.application.main import main as exabgp_main
    from exabgp.reactor.loop import Reactor

    if not rest_when_idle(Reactor):
        print("l3fabric: this ExaBGP has no Reactor._wait_for_io; running it unchanged",
              file=sys.stderr)
    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    return int(exabgp_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
