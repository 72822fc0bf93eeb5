"""Waiting for an agent that is starting, or dying while its successor starts: the
control socket resets the connection, closes it half-way through an answer or
without one. The stand-in here does exactly that, in order, inside a real namespace,
then answers; no real agent can be made to do it on cue."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable

import pytest

from fabric import sockets
from fabric.kernel import netns
from fabric.kernel.netns import entered
from fabric.lab.topology import HostState, Lab
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]


def read_all(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def reset(conn: socket.socket) -> None:
    select.select([conn], [], [])  # the request arrived; closing unread resets
    conn.close()


def half_answer(conn: socket.socket) -> None:
    read_all(conn)
    conn.sendall(b'{"result": {"no')


def no_answer(conn: socket.socket) -> None:
    read_all(conn)


def answer(conn: socket.socket) -> None:
    read_all(conn)
    conn.sendall(b'{"result": {"node": "h1"}}')


def serve(server: socket.socket, behaviours: list[Callable[[socket.socket], None]]) -> None:
    for behave in behaviours:
        conn, _ = server.accept()
        try:
            behave(conn)
        finally:
            conn.close()


def test_wait_agent_takes_resets_and_cut_answers_for_not_ready(tmp_path, netns_factory):
    ns = netns_factory()
    lab = Lab(f"cli{os.getpid() % 100000:05d}w", tmp_path)
    with lab.locked() as state:  # "the agent" is this process: it is running
        state.hosts["h1"] = HostState("h1", ns, "10.99.0.11", str(tmp_path / "h1"),
                                      agent_pid=os.getpid())
    with entered(netns.path(ns)):  # an abstract socket belongs to its namespace
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sockets.address(sockets.CONTROL_SOCKET))
    server.listen()
    stand_in = threading.Thread(target=serve, args=(
        server, [reset, reset, half_answer, no_answer, answer]), daemon=True)
    stand_in.start()
    try:
        assert lab.wait_agent("h1", timeout=60) == {"node": "h1"}
    finally:
        server.close()
    stand_in.join(timeout=10)
