"""A machine that shuts down leaves: its agent withdraws its own routes before ExaBGP
stops (peers drop them at once), where a plain stop keeps them for graceful restart.
The owner loop decides the withdrawal (it owns what we announce); the speaker's own
thread says when ExaBGP has taken it."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bgp import api
from bgp.speaker import Speaker
from fabric.agent import messages as m
from fabric.agent import service
from fabric.agent.clock import FakeClock
from fabric.agent.config import AgentConfig
from fabric.agent.service import Agent
from fabric.model.blocks import Block
from tests.unit.test_agent_state import Fabric


def test_leaving_withdraws_every_own_route_and_announces_none_again():
    fab = Fabric()
    done: Future[bool] = Future()
    jobs = fab.send(m.Leave(done))
    assert jobs == [m.Send(tuple(api.withdraw(["10.244.0.0/26"]))), m.Flush(done)]
    blocks = dict(fab.records["blocks"])
    blocks["10.244.0.128/26"] = Block("10.244.0.128/26", "p", "a").to_record()
    fab.snapshot("blocks", blocks)  # a block claimed while going down: not announced
    assert not [c for c in fab.commands() if "announce" in c]


class Loop:
    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.posted: list[Any] = []

    def post(self, message: Any) -> None:
        self.posted.append(message)
        if self.answer is not None:
            message.reply.set_result(self.answer)


def agent() -> Agent:
    return Agent(AgentConfig(node_address="192.0.2.1"), clock=FakeClock())


def test_the_agent_asks_its_loop_to_leave_and_waits_at_most_the_timeout(monkeypatch):
    monkeypatch.setattr(service, "LEAVE_SETTLE", 0.0)
    monkeypatch.setattr(service, "LEAVE_TIMEOUT", 0.1)
    for answer in (True, False, None):  # None: never answered, stop anyway after 0.1 s
        a = agent()
        a.loop = Loop(answer)  # type: ignore[assignment]
        a._leave()
        assert [type(p) for p in a.loop.posted] == [m.Leave]  # type: ignore[attr-defined]


def test_an_agent_stopped_before_it_ran_has_nothing_to_withdraw():
    agent()._leave()  # no loop: nothing to do, no error


def test_a_flush_is_settled_once_exabgp_answered_what_was_sent(tmp_path: Path):
    """What the speaker's thread does each turn, step by step."""
    speaker = Speaker(["exabgp"], tmp_path, {}, "@test-relay", lambda _: None)
    done: Future[bool] = Future()
    speaker.flush(done)
    speaker._take_requests()
    speaker._settle_flushes()
    assert not done.done()  # no connection to ExaBGP: the commands cannot go
    speaker._conn = object()  # type: ignore[assignment]
    speaker._watchdog.owed = 2
    speaker._settle_flushes()
    assert not done.done()  # sent, not answered yet
    speaker._watchdog.owed = 0
    speaker._waiting.append(b"withdraw ...\n")
    speaker._settle_flushes()
    assert not done.done()  # still to be written
    speaker._waiting.clear()
    speaker._settle_flushes()
    assert done.result(0) is True
