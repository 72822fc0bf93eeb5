"""Local unix-socket servers of the agent, and the client side fabricctl uses.

A name starting with `@` is an abstract socket: it belongs to the network namespace
it was bound in, so every host (and every lab host, being a namespace) has its own
without any file to clean up, and a runtime calling the CNI plugin inside a host's
namespace reaches that host's agent. Other names are filesystem paths.

Only root may talk to the agent: abstract sockets have no file permissions, so each
connection's peer credentials are checked.

A server thread never waits or buffers without bound: a request larger than the
server's limit, or one that does not arrive in full within its read timeout (a
client that connected and went quiet), closes the connection unanswered.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fabric import logs
from fabric.kernel.netns import entered

_UCRED = struct.Struct("=iII")
CONTROL_SOCKET = "@l3fabric/agent"  # the agent's default control socket (fabricctl)
# Defaults for serve(): enough for the largest CNI request the shim sends
# (cni.shim.MAX_REQUEST, a test keeps them in step), and far more time than a local
# client needs to write it. Callers with smaller requests pass smaller limits.
MAX_REQUEST = 8 << 20
READ_TIMEOUT = 10.0


class AgentUnreachable(ConnectionError):
    pass


def address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name


def peer_uid(sock: socket.socket) -> int:
    return peer_credentials(sock)[1]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it connect."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(creds)
    return pid, uid, gid


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # socketserver's default backlog is 5: 20 CNI requests at once overflowed it.
    request_queue_size = 256


@dataclass(frozen=True)
class Received:
    """What `read_request` got from one client."""

    data: bytes
    fds: list[int]
    refused: str | None = None  # why the request was dropped, None when complete


def read_request(sock: socket.socket, max_bytes: int, timeout: float) -> Received:
    """Everything the client sends until it shuts down its write side, with the
    descriptors passed along (SCM_RIGHTS).

    Gives up, with `refused` saying why, past `max_bytes` or when the whole request
    has not arrived `timeout` seconds after the first read: a deadline for the whole
    request rather than per read, so a client trickling a byte at a time cannot hold
    the thread either.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    fds: list[int] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Received(b"", fds, f"no complete request within {timeout:g}s")
        sock.settimeout(remaining)
        try:
            chunk, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        except TimeoutError:
            return Received(b"", fds, f"no complete request within {timeout:g}s")
        except OSError as exc:  # the client reset the connection
            return Received(b"", fds, f"connection failed: {exc.strerror or exc}")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds += list(struct.unpack(f"={usable // 4}i", data[:usable]))
        if not chunk:
            return Received(b"".join(chunks), fds)
        size += len(chunk)
        if size > max_bytes:
            return Received(b"", fds, f"request larger than {max_bytes} bytes")
        chunks.append(chunk)


def serve(name: str, handle: Callable[[bytes, list[int]], bytes], label: str, *,
          max_request: int = MAX_REQUEST, read_timeout: float = READ_TIMEOUT) -> _Server:
    """Serve `handle(request bytes, descriptors) -> response bytes` on `name`, one thread
    per client. A request is everything the client sends until it shuts down its write
    side; descriptors passed with it (SCM_RIGHTS) are closed after `handle` returns.

    A request over `max_request` bytes, or not complete within `read_timeout` seconds,
    is dropped: the connection is closed without an answer and `handle` never sees it.
    The same timeout bounds sending the answer to a client that stopped reading.
    """
    log = logs.get("socket", socket=name, server=label)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            if peer_uid(sock) != 0:
                sock.sendall(b"")
                return
            got = read_request(sock, max_request, read_timeout)
            try:
                if got.refused is not None:
                    log.warning("request dropped", reason=got.refused)
                    return
                try:
                    reply = handle(got.data, got.fds)
                except Exception:
                    log.exception("request handler failed")
                    return
            finally:
                for fd in got.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            sock.settimeout(read_timeout)
            with contextlib.suppress(OSError):
                sock.sendall(reply)

    if not name.startswith("@"):
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    try:
        server = _Server(address(name), Handler)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {name}: {exc.strerror} "
                                 "(is another agent running in this namespace?)") from exc
    thread = threading.Thread(target=server.serve_forever, name=f"serve-{label}",
                              daemon=True)
    thread.start()
    return server


def request(name: str, payload: bytes, timeout: float = 30.0,
            netns: str | None = None) -> bytes:
    """Send one request and read the whole answer; `netns` to reach a lab host's agent."""
    context = entered(netns) if netns else contextlib.nullcontext()
    with context:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(address(name))
        except OSError as exc:
            where = f" in {netns}" if netns else ""
            raise AgentUnreachable(f"the l3fabric agent is not reachable on {name}{where}: "
                                   f"{exc.strerror or exc}") from exc
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError as exc:
        raise AgentUnreachable(f"the l3fabric agent on {name} did not answer in time") from exc
    finally:
        sock.close()


def call(name: str, method: str, netns: str | None = None, **params: Any) -> Any:
    """One control request: JSON in, JSON out; errors come back as AgentError."""
    raw = request(name, json.dumps({"method": method, "params": params}).encode(),
                  netns=netns)
    if not raw:
        raise AgentUnreachable(f"the l3fabric agent on {name} closed the connection "
                               "(only root may use it)")
    reply = json.loads(raw)
    if "error" in reply:
        raise AgentError(reply["error"])
    return reply["result"]


class AgentError(RuntimeError):
    """The agent understood the request and refused it."""
