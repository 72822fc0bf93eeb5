"""`fabric.sockets.serve` bounds what a client can make a server thread hold: request
size and time. Real unix sockets, abstract names unique to this test process."""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from fabric import sockets
from tests.conftest import PREFIX, needs_root

pytestmark = [needs_root]  # serve() answers root only (peer credentials)

_names = itertools.count()


@pytest.fixture
def server() -> Iterator[Callable[..., tuple[str, list[bytes]]]]:
    """start(**limits) -> (socket name, requests the handler saw); shut down after."""
    started: list[sockets._Server] = []

    def start(**limits: object) -> tuple[str, list[bytes]]:
        name = f"@{PREFIX}/sockets-{next(_names)}"
        seen: list[bytes] = []

        def handle(data: bytes, _fds: list[int]) -> bytes:
            seen.append(data)
            return b"echo:" + data

        started.append(sockets.serve(name, handle, "test", **limits))  # type: ignore[arg-type]
        return name, seen

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def connect(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)  # only a safety net: the server must close first
    sock.connect(sockets.address(name))
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_within_the_limit_is_answered(server):
    name, seen = server(max_request=1000)
    assert sockets.request(name, b"x" * 1000) == b"echo:" + b"x" * 1000
    assert seen == [b"x" * 1000]


def test_a_request_over_the_limit_is_dropped_unread(server):
    name, seen = server(max_request=1000)
    sock = connect(name)
    sender = threading.Thread(target=_send_quietly, args=(sock, b"y" * 1_000_000))
    sender.start()
    assert read_all(sock) == b""
    sender.join()
    sock.close()
    assert seen == []
    # The server is still there for the next client.
    assert sockets.request(name, b"ok") == b"echo:ok"


def test_a_silent_client_is_dropped(server):
    name, seen = server(read_timeout=0.3)
    sock = connect(name)  # connects and sends nothing, never shuts down its side
    assert read_all(sock) == b""
    sock.close()
    assert seen == []
    assert sockets.request(name, b"ok") == b"echo:ok"


def test_a_client_that_stops_half_way_is_dropped(server):
    name, seen = server(read_timeout=0.3)
    sock = connect(name)
    sock.sendall(b"partial request")  # and never the end of it
    assert read_all(sock) == b""
    sock.close()
    assert seen == []


def test_descriptors_of_a_dropped_request_are_closed(server):
    name, seen = server(max_request=10)
    read_end, write_end = os.pipe()
    try:
        sock = connect(name)
        sock.sendmsg([b"z" * 100], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      write_end.to_bytes(4, sys.byteorder))])
        os.close(write_end)
        write_end = -1
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
        sock.close()
        # Every copy of the write end is closed once the server closed its copy.
        os.set_blocking(read_end, True)
        assert os.read(read_end, 1) == b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert seen == []


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """The server closes mid-send: that is the expected outcome, not an error."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
