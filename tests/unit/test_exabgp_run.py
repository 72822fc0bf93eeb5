"""ExaBGP's reactor rests when idle, and only then; its API is the agent's socket
(bgp.exabgp_run)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from bgp import relay
from bgp.exabgp_run import (
    IDLE_AFTER,
    IDLE_WAIT_MS,
    AgentConnection,
    connect_api_in_process,
    rest_when_idle,
)


class FakeReactor:
    """Stands in for exabgp.reactor.loop.Reactor: records the poll timeouts it gets."""

    def __init__(self) -> None:
        self.waits: list[int] = []
        self.ready: list[int] = []
        self.processes = type("Processes", (), {"fds": [9]})()  # the API's descriptor

    def _wait_for_io(self, sleeptime):
        self.waits.append(sleeptime)
        yield from self.ready


def test_the_wait_grows_only_after_a_quiet_second():
    now = [100.0]
    rest_when_idle(FakeReactor, clock=lambda: now[0])
    reactor = FakeReactor()
    list(reactor._wait_for_io(10))  # first turn: counts as busy
    list(reactor._wait_for_io(0))  # work to do, turn after turn: busy now
    list(reactor._wait_for_io(0))
    now[0] += IDLE_AFTER / 2
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == 10  # recently busy: ExaBGP's own pace
    now[0] += IDLE_AFTER
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == IDLE_WAIT_MS  # quiet: rest
    reactor.ready = [7]  # a peer's keepalive woke the poll: its one turn, still resting
    assert list(reactor._wait_for_io(10)) == [7]
    reactor.ready = []
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == IDLE_WAIT_MS
    list(reactor._wait_for_io(0))  # one more turn asked after a keepalive: not work
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == IDLE_WAIT_MS
    reactor.ready = [9]  # a command from the agent: an UPDATE to send follows
    assert list(reactor._wait_for_io(10)) == [9]
    reactor.ready = []
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == 10  # busy again: back to the short wait at once


def test_wrapping_twice_is_harmless_and_a_missing_method_is_reported():
    assert rest_when_idle(FakeReactor) and rest_when_idle(FakeReactor)

    class Other:
        pass

    assert rest_when_idle(Other) is False


def test_the_installed_exabgp_has_the_method_we_wrap():
    from exabgp.reactor.loop import Reactor

    assert callable(getattr(Reactor, "_wait_for_io", None))


# -- the API connection: ExaBGP's own process manager, a socket where the relay was ----
@pytest.fixture
def exabgp_api():
    """ExaBGP's real `Processes`, wrapped, with the relay command pointing at our socket."""
    from exabgp.environment import getenv
    from exabgp.logger import option
    from exabgp.reactor.api import processes

    option.setup(getenv())
    assert connect_api_in_process(processes)
    name = f"@l3f-unit-api-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(relay.address(name))
    listener.listen(1)
    manager = processes.Processes()
    manager.start({"api": {"run": relay.command(name), "encoder": "json", "respawn": False}})
    listener.settimeout(5)
    agent_end, _ = listener.accept()
    try:
        yield manager, agent_end
    finally:
        agent_end.close()
        listener.close()
        manager.terminate()


def test_exabgp_reads_the_agents_commands_with_no_process_between(exabgp_api):
    manager, agent_end = exabgp_api
    assert all(isinstance(p, AgentConnection) for p in manager._process.values())
    agent_end.sendall(b"announce route 10.0.0.0/24 next-hop self\npartial")
    time.sleep(0.05)
    assert list(manager.received()) == [("api", "announce route 10.0.0.0/24 next-hop self")]


def test_a_write_bigger_than_the_socket_buffer_arrives_whole_and_once(exabgp_api):
    manager, agent_end = exabgp_api
    message = "u" * 3_000_000  # ExaBGP set the socket non-blocking; a resend would duplicate
    got = bytearray()

    def slow_reader():
        while len(got) < len(message) + 1:
            time.sleep(0.001)
            got.extend(agent_end.recv(65536))

    reader = threading.Thread(target=slow_reader)
    reader.start()
    manager.write("api", message)
    reader.join(timeout=20)
    assert bytes(got) == message.encode() + b"\n"


def test_the_agent_closing_its_end_ends_the_api_process(exabgp_api):
    manager, agent_end = exabgp_api
    agent_end.close()
    time.sleep(0.05)
    assert list(manager.received()) == []
    assert manager._process == {} and manager.fds == []  # as when the relay exited


def test_other_commands_still_start_processes():
    from exabgp.reactor.api import processes

    assert connect_api_in_process(processes)
    child = processes.subprocess.Popen(["true"])
    assert child.wait(timeout=10) == 0


def test_no_agent_listening_is_an_error_exabgp_handles():
    with pytest.raises(OSError):
        AgentConnection(f"@l3f-unit-nobody-{os.getpid()}")
