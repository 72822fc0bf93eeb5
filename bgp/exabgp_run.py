"""How the agent runs ExaBGP: ExaBGP's own main, with a reactor that rests when idle
and its API connected straight to the agent's socket.

Resting when idle:

ExaBGP 5.0.15's reactor gives every peer a turn every `reactor.speed / 100` seconds
(10 ms by default) whether anything happened or not, so a node at rest spent 2.2% of
a core with 2 peers and 6.8% with 39 (measured here). A longer period cuts that, but
sending an UPDATE takes the peer several turns, each waiting out the period when it
has nothing to read: at 100 ms a new block took 250 ms to reach the next node
instead of 10 ms.

So the wait stays 10 ms while there is work, and grows to `IDLE_WAIT_MS` once there
has been none for `IDLE_AFTER` seconds. Work is a command from the agent (an UPDATE to
send follows, in steps of ExaBGP's scheduler) or peers asking for another turn at once
on consecutive turns (the reactor passes a zero wait: UPDATEs coming in or going out).
A single such turn is not: ExaBGP asks for one after every message it reads, so every
keepalive counted as work, and 40 peers' keepalives (13 a second) kept ExaBGP at its
10 ms pace for good, at 6% of a core (measured here). Nothing is lost by resting:
data from a peer and commands from the agent wake ExaBGP's poll at once (their
descriptors are in it), and BGP's own timers are seconds (keepalive every 3 s for a
hold time of 9 s).

The API connection: ExaBGP's configuration names an API process (`bgp.relay`) that
would copy bytes between ExaBGP's pipes and the agent's socket: a Python process per
host (12 MB resident) and a copy of every UPDATE. ExaBGP drives an API process only
through `subprocess.Popen`'s surface, so when it asks for the relay it gets an
`AgentConnection` instead: the same bytes over the agent's socket, no process between.

Both wrap a pinned release (`exabgp==5.0.15`); where a wrapped name is not there,
ExaBGP runs unchanged (idle at 10 ms; the relay as its API process) and says so on
stderr (the agent keeps that in exabgp.log).
"""

from __future__ import annotations

import re
import select
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bgp import relay

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
        zeros = getattr(self, "_l3fabric_zeros", 0) + 1 if sleeptime == 0 else 0
        self._l3fabric_zeros = zeros
        if zeros >= 2:
            self._l3fabric_busy = now
        elif sleeptime and now - last > IDLE_AFTER:
            sleeptime = max(sleeptime, IDLE_WAIT_MS)
        api = getattr(getattr(self, "processes", None), "fds", ())
        commanded = False
        for fd in original(self, sleeptime):
            commanded = commanded or fd in api
            yield fd
        if commanded:
            self._l3fabric_busy = clock()

    _wait_for_io._l3fabric = True  # type: ignore[attr-defined]
    reactor_class._wait_for_io = _wait_for_io
    return True


class _SocketWriter:
    """`stdin` of an AgentConnection: whole writes, as a blocking pipe would do them.

    ExaBGP sets its API process's stdout non-blocking, which here is the same socket,
    and on EAGAIN it would write the whole line again (duplicating its first part); so
    a full socket buffer is waited out here instead.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except BlockingIOError:
                select.select([], [self._sock], [])
        return len(data)

    def flush(self) -> None:
        pass


class AgentConnection:
    """What ExaBGP holds for its API process: a connection to the agent's socket.

    ExaBGP uses `stdin.write/flush`, `os.read(stdout.fileno())` after polling it,
    `poll()` (not None once the process is gone: here, once the agent closed its end)
    and `terminate/kill/wait` when done.
    """

    def __init__(self, socket_name: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(relay.address(socket_name))
        except OSError:
            self._sock.close()
            raise  # ExaBGP marks its API broken and, with api.terminate, exits
        self.stdin = _SocketWriter(self._sock)
        self.stdout = self._sock
        self.returncode: int | None = None
        self.pid = 0

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                if self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self.returncode = 0  # the agent closed its end
            except BlockingIOError:
                pass
            except OSError:
                self.returncode = 1
        return self.returncode

    def terminate(self) -> None:
        if self.returncode is None:
            self.returncode = 0
        self._sock.close()

    kill = terminate

    def wait(self, timeout: float | None = None) -> int:
        self.terminate()
        return self.returncode or 0


def connect_api_in_process(processes_module: Any) -> bool:
    """Make `processes_module` (ExaBGP's API process manager) open an AgentConnection
    where it would start the relay; False when the module has no `subprocess` to wrap."""
    real = getattr(processes_module, "subprocess", None)
    if getattr(real, "Popen", None) is None:
        return False
    if getattr(real, "_l3fabric", False):
        return True

    def popen(args: Sequence[str], *rest: Any, **kwargs: Any) -> Any:
        name = relay.socket_of(list(args)) if not isinstance(args, str) else None
        if name is None:
            return real.Popen(args, *rest, **kwargs)
        return AgentConnection(name)

    wrapped = types.SimpleNamespace(**{k: v for k, v in vars(real).items()
                                       if not k.startswith("__")})
    wrapped.Popen = popen
    wrapped._l3fabric = True
    processes_module.subprocess = wrapped
    return True


def main() -> int:
    from exabgp.application.main import main as exabgp_main
    from exabgp.reactor.api import processes
    from exabgp.reactor.loop import Reactor

    if not rest_when_idle(Reactor):
        print("l3fabric: this ExaBGP has no Reactor._wait_for_io; running it unchanged",
              file=sys.stderr)
    if not connect_api_in_process(processes):
        print("l3fabric: this ExaBGP starts API processes differently; the relay runs",
              file=sys.stderr)
    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    return int(exabgp_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
