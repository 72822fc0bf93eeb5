"""The owner loop with real threads around it: inputs from many threads, one order out.

The adapters are replaced by a recorder that applies kernel jobs to a dict in the
order the loop dispatches them (as the kernel writer's FIFO does); whatever the
interleaving of the posting threads, the result must be what the state decided.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from bgp import api
from fabric.agent import messages as m
from fabric.agent.clock import FakeClock, SystemClock
from fabric.agent.loop import OwnerLoop
from fabric.agent.routing import Settings
from fabric.agent.state import MIRRORS, AgentState, Intervals
from fabric.kernel.routes import Route
from fabric.model.blocks import Block
from fabric.model.nodes import Node
from fabric.model.pools import parse_pool
from fabric.model.prefix import Prefix

A, B = Node("a", "192.0.2.1", 64512), Node("b", "192.0.2.2", 64512)
C = Node("c", "192.0.2.3", 64512)


class Recorder:
    def __init__(self) -> None:
        self.kernel: dict[Prefix, Route] = {}
        self.jobs: list[m.Job] = []

    def __call__(self, job: m.Job) -> None:
        self.jobs.append(job)
        if isinstance(job, m.ApplyRoutes):
            for prefix in job.delete:
                self.kernel.pop(prefix, None)
            for route in job.replace:
                self.kernel[route.prefix] = route
            if job.reply is not None:
                job.reply.set_result([])


def started(clock=None) -> tuple[OwnerLoop, Recorder, threading.Thread]:
    clock = clock or SystemClock()
    state = AgentState(A, clock, Settings(max_prefixes=10_000), Intervals(resync=3600,
                       links=3600, gc=3600, gc_first=3600, liveness=3600))
    recorder = Recorder()
    loop = OwnerLoop(state, clock, recorder)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    for name in MIRRORS:
        loop.post(m.Snapshot(name, {}))
    loop.post(m.Snapshot("nodes", {n.name: n.to_record() for n in (A, B, C)}))
    loop.post(m.Snapshot("pools", {"p": parse_pool("p", "10.244.0.0/16").to_record()}))
    return loop, recorder, thread


def test_inputs_from_many_threads_reach_the_kernel_in_the_states_order():
    loop, recorder, thread = started()
    loop.post(m.BgpEvent(0, api.PeerState("192.0.2.2", "up")))
    blocks = [f"10.244.{i}.0/26" for i in range(1, 41)]

    def updates() -> None:
        for cidr in blocks:  # b announces every block, with itself as next hop
            loop.post(m.BgpEvent(0, api.Update("192.0.2.2", {"192.0.2.2": [cidr]}, [])))
            loop.post(m.BgpEvent(0, api.Update("192.0.2.2", {}, [cidr])))
            loop.post(m.BgpEvent(0, api.Update("192.0.2.2", {"192.0.2.2": [cidr]}, [])))

    def claims() -> None:  # meanwhile etcd says every other block belongs to a third node
        for count in range(1, len(blocks) + 1):
            loop.post(m.Snapshot("blocks", {c: Block(c, "p", "c" if i % 2 else "b")
                                             .to_record() for i, c in
                                             enumerate(blocks[:count])}))

    workers = [threading.Thread(target=f) for f in (updates, claims, updates)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    decided = loop.ask(lambda s: dict(s.desired.source("learned")))
    selected = loop.ask(lambda s: set(s.routing.rib.selected_prefixes()))
    loop.stop()
    thread.join(5)
    assert set(decided) == selected  # the desired state is the RIB's decision
    learned = {p: r for p, r in recorder.kernel.items() if r.type != "blackhole"}
    assert learned == decided  # and the kernel got there, in order
    # Blocks of the third node arrive with b as next hop: rejected, never installed.
    assert {str(p) for p in learned} == {c for i, c in enumerate(blocks) if not i % 2}


def test_queries_see_every_message_posted_before_them():
    loop, _, thread = started()
    for i in range(200):
        loop.post(m.Snapshot("workloads", {"k": {"n": i}}))
    seen = loop.ask(lambda s: s.mirrors_seen >= set(MIRRORS))
    loop.stop()
    thread.join(5)
    assert seen


def test_a_failing_message_answers_its_caller_and_the_loop_goes_on():
    clock = FakeClock()
    loop, _, thread = started(clock)
    reply: Future = Future()
    loop.post(m.Attach("c1.eth0", ("not-an-address",), "l3f0", 3, reply))
    try:
        reply.result(5)
    except ValueError as exc:
        assert "not-an-address" in str(exc)
    else:
        raise AssertionError("a bad Attach must fail its caller")
    assert loop.ask(lambda s: s.ready)  # still serving
    loop.stop()
    thread.join(5)


def test_a_burst_of_snapshots_from_a_mirror_is_handled_as_its_newest_one():
    clock = FakeClock()
    state = AgentState(A, clock, Settings(max_prefixes=10_000))
    handled: list[object] = []
    real = state.handle
    state.handle = lambda message: handled.append(message) or real(message)  # type: ignore[method-assign]
    loop = OwnerLoop(state, clock, Recorder())
    post = loop.snapshots("workloads")
    for count in range(500):  # the loop is busy: nothing is taken meanwhile
        post({f"k{i}": {"handle": f"h{i}.eth0", "node": "a"} for i in range(count)}, {})
    assert loop.inbox.qsize() == 1  # one token, not 500 full copies
    loop.step(loop.inbox.get())
    [snapshot] = handled
    assert isinstance(snapshot, m.Snapshot) and len(snapshot.records) == 499
    post({}, {})  # a later change is queued again
    assert loop.inbox.qsize() == 1
