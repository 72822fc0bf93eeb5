"""What makes the agent unhealthy (and exit to be restarted), and per-handle CNI locks
that leave nothing behind."""

from __future__ import annotations

import threading
import time

from cni.handler import HandleLocks
from fabric.agent.clock import FakeClock
from fabric.agent.config import AgentConfig
from fabric.agent.service import STUCK_LOOP, Agent


class Beat:
    def __init__(self, at: float) -> None:
        self.beat = at


def agent_with(threads: dict[str, threading.Thread], beat_age: float) -> Agent:
    clock = FakeClock()
    agent = Agent(AgentConfig(node_address="192.0.2.1"), clock=clock)
    agent._threads = threads
    agent.loop = Beat(clock.monotonic() - beat_age)  # type: ignore[assignment]
    return agent


def finished() -> threading.Thread:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return thread


def test_a_dead_thread_or_a_stuck_loop_is_a_failed_health_check():
    alive = threading.Event()
    running = threading.Thread(target=alive.wait, daemon=True)
    running.start()
    try:
        assert agent_with({"owner-loop": running}, 0.5).problems() == []
        assert agent_with({"owner-loop": running, "kernel-writer": finished()}, 0.5
                          ).problems() == ["thread kernel-writer died"]
        stuck = agent_with({"owner-loop": running}, STUCK_LOOP + 1)
        assert stuck.problems() == [f"owner loop stuck for {STUCK_LOOP + 1:.0f}s"]
        assert not stuck.health()["healthy"]
    finally:
        alive.set()


def test_handle_locks_serialize_one_handle_and_leave_no_entry_behind():
    locks = HandleLocks()
    order: list[str] = []

    def use(name: str, handle: str, hold: float) -> None:
        with locks.held(handle):
            order.append(f"{name}+")
            time.sleep(hold)
            order.append(f"{name}-")

    first = threading.Thread(target=use, args=("a", "c1.eth0", 0.2))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=use, args=("b", "c1.eth0", 0.0))
    other = threading.Thread(target=use, args=("x", "c2.eth0", 0.0))
    second.start()
    other.start()
    for thread in (first, second, other):
        thread.join()
    assert order.index("a-") < order.index("b+")  # same handle: one after the other
    assert order.index("x-") < order.index("a-")  # another handle did not wait
    for round_ in range(1000):
        with locks.held(f"c{round_}.eth0"):
            pass
    assert len(locks) == 0  # an ADD+DEL cycle leaves nothing behind
