"""ExaBGP's reactor rests when idle, and only then (bgp.exabgp_run)."""

from __future__ import annotations

from bgp.exabgp_run import IDLE_AFTER, IDLE_WAIT_MS, rest_when_idle


class FakeReactor:
    """Stands in for exabgp.reactor.loop.Reactor: records the poll timeouts it gets."""

    def __init__(self) -> None:
        self.waits: list[int] = []
        self.ready: list[int] = []

    def _wait_for_io(self, sleeptime):
        self.waits.append(sleeptime)
        yield from self.ready


def test_the_wait_grows_only_after_a_quiet_second():
    now = [100.0]
    rest_when_idle(FakeReactor, clock=lambda: now[0])
    reactor = FakeReactor()
    list(reactor._wait_for_io(10))  # first turn: counts as busy
    list(reactor._wait_for_io(0))  # work to do: busy now
    now[0] += IDLE_AFTER / 2
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == 10  # recently busy: ExaBGP's own pace
    now[0] += IDLE_AFTER
    list(reactor._wait_for_io(10))
    assert reactor.waits[-1] == IDLE_WAIT_MS  # quiet: rest
    reactor.ready = [7]  # a peer's socket or a command woke the poll
    assert list(reactor._wait_for_io(10)) == [7]
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
