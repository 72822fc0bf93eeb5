"""The API process ExaBGP is configured to run: joins its stdin/stdout to the agent's socket.

ExaBGP starts its API processes itself, so the agent cannot hand it a pipe; this
relay connects to the agent's local socket and copies bytes both ways until either
side closes. When it exits ExaBGP exits too (`exabgp.api.terminate`), and the agent
starts a new one. Standard library only, no parsing.

Under `bgp.exabgp_run` (how the agent runs ExaBGP) this process is never started:
ExaBGP connects to the agent's socket itself (`exabgp_run.AgentConnection`), which
saves a process per host. The relay is what an ExaBGP not wrapped that way runs.

Both directions are buffered and written only when the other side can take them: a
relay that blocked writing one way while the other side blocked writing back would
deadlock ExaBGP and the agent together.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
from collections.abc import Callable

MODULE = "bgp.relay"


def command(socket_name: str) -> list[str]:
    """The `run` command of ExaBGP's API process for the agent listening on `socket_name`."""
    return [sys.executable, "-m", MODULE, socket_name]


def socket_of(argv: list[str] | tuple[str, ...]) -> str | None:
    """The agent socket a `command()` connects to; None for any other command."""
    if len(argv) == 4 and tuple(argv[1:3]) == ("-m", MODULE):
        return argv[3]
    return None


def address(name: str) -> str:
    """`@name` is in the abstract namespace (as fabric.sockets has it; stdlib only here)."""
    return "\0" + name[1:] if name.startswith("@") else name


def main() -> int:
    name = sys.argv[1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(name))
    except OSError as exc:
        print(f"relay: cannot reach the agent on {name}: {exc}", file=sys.stderr)
        return 1
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    for fd in (stdin, stdout, sock.fileno()):
        os.set_blocking(fd, False)
    to_agent, to_exabgp = bytearray(), bytearray()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    writing_stdout = False
    while True:
        for key, _ in selector.select():
            if key.fd == stdin:
                data = _read(lambda: os.read(stdin, 1 << 20))
                if data == b"":
                    return 0
                to_agent += data or b""
            elif key.fd == sock.fileno():
                data = _read(lambda: sock.recv(1 << 20))
                if data == b"":
                    return 0
                to_exabgp += data or b""
        # Write what each side can take now; ask to be woken for the rest.
        _write(sock.send, to_agent)
        _write(lambda data: os.write(stdout, data), to_exabgp)
        selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if to_agent else 0))
        if bool(to_exabgp) != writing_stdout:
            if to_exabgp:
                selector.register(stdout, selectors.EVENT_WRITE)
            else:
                selector.unregister(stdout)
            writing_stdout = bool(to_exabgp)


def _read(call: Callable[[], bytes]) -> bytes | None:
    """The bytes, b"" at end of stream, None when nothing is there after all."""
    try:
        return call()
    except BlockingIOError:
        return None


def _write(send: Callable[[bytearray], int], pending: bytearray) -> None:
    while pending:
        try:
            del pending[:send(pending)]
        except BlockingIOError:
            return


if __name__ == "__main__":
    sys.exit(main())
