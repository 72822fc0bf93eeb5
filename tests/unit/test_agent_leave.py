"""A machine that shuts down leaves: its agent withdraws its own routes before ExaBGP
stops (peers drop them at once), where a plain stop keeps them for graceful restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bgp import api
from bgp.speaker import Speaker
from fabric.agent import service
from fabric.agent.clock import FakeClock
from fabric.agent.config import AgentConfig
from fabric.agent.service import Agent


class State:
    class announcer:  # stands for AgentState.announcer
        announced = frozenset({"10.244.1.0/26", "fd00:244::40/122"})


class Loop:
    def ask(self, read: Any, timeout: float = 30.0) -> Any:
        return read(State())


class FakeSpeaker:
    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []

    def send(self, commands: list[str]) -> None:
        self.calls.append(("send", list(commands)))

    def drain(self, timeout: float) -> bool:
        self.calls.append(("drain", timeout))
        return self.answers


def agent() -> Agent:
    return Agent(AgentConfig(node_address="192.0.2.1"), clock=FakeClock())


def test_leaving_withdraws_every_own_route_and_waits_for_exabgp(monkeypatch):
    monkeypatch.setattr(service, "LEAVE_SETTLE", 0.0)
    for answers in (True, False):  # not answered: stop anyway, peers' GR timer will do
        a = agent()
        a.loop = Loop()
        a.speaker = FakeSpeaker(answers)
        a._withdraw_own_routes()
        assert a.speaker.calls == [
            ("send", api.withdraw(["10.244.1.0/26", "fd00:244::40/122"])),
            ("drain", service.LEAVE_TIMEOUT)]


def test_an_agent_stopped_before_it_ran_has_nothing_to_withdraw():
    agent()._withdraw_own_routes()  # no loop, no speaker: nothing to do, no error


def test_drain_waits_for_exabgp_to_answer_what_was_sent(tmp_path: Path):
    speaker = Speaker(["exabgp"], tmp_path, {}, "@test-relay", lambda _: None)
    assert not speaker.drain(0.1)  # no connection to ExaBGP: the commands cannot go
    speaker._conn = object()  # type: ignore[assignment]
    speaker._watchdog.owed = 2
    assert not speaker.drain(0.1)  # sent, not answered yet
    speaker._watchdog.owed = 0
    assert speaker.drain(0.1)
    speaker.send(["withdraw route 10.244.1.0/26 next-hop self"])
    assert not speaker.drain(0.1)  # asked for, not written yet (the thread does that)
