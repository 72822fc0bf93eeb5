"""Local unix-socket servers of the agent, and the client side fabricctl uses.

A name starting with `@` is an abstract socket: it belongs to the network namespace
it was bound in, so every host (and every lab host, being a namespace) has its own
without any file to clean up, and a runtime calling the CNI plugin inside a host's
namespace reaches that host's agent. Other names are filesystem paths.

Only root may talk to the agent: abstract sockets have no file permissions, so each
connection's peer credentials are checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any

from fabric import logs
from fabric.kernel.netns import entered

_UCRED = struct.Struct("=iII")
CONTROL_SOCKET = "@l3fabric/agent"  # the agent's default control socket (fabricctl)


class AgentUnreachable(ConnectionError):
    pass


def address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(creds)[1]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


def serve(name: str, handle: Callable[[bytes, list[int]], bytes], label: str) -> _Server:
    """Serve `handle(request bytes, descriptors) -> response bytes` on `name`, one thread
    per client. A request is everything the client sends until it shuts down its write
    side; descriptors passed with it (SCM_RIGHTS) are closed after `handle` returns.
    """
    log = logs.get("socket", socket=name, server=label)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            if peer_uid(sock) != 0:
                sock.sendall(b"")
                return
            chunks, fds = [], []
            while True:
                chunk, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        usable = len(data) - len(data) % 4
                        fds += list(struct.unpack(f"={usable // 4}i", data[:usable]))
                if not chunk:
                    break
                chunks.append(chunk)
            try:
                reply = handle(b"".join(chunks), fds)
            except Exception:
                log.exception("request handler failed")
                return
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
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
