"""When ExaBGP counts as hung (bgp.watchdog), on an injected clock."""

from __future__ import annotations

from bgp.watchdog import ApiWatchdog


def test_a_quiet_exabgp_is_probed_and_an_answering_one_never_hung():
    dog = ApiWatchdog(probe_every=3, patience=10)
    dog.connected(0.0)
    assert not dog.probe_due(2.9) and dog.probe_due(3.0)
    for now in range(3, 100, 3):  # probe, answered at once, every 3 s
        assert dog.probe_due(float(now))
        dog.probed(float(now))
        dog.sent(1, float(now))
        dog.answered(float(now))
        assert not dog.hung(now + 0.01)


def test_no_answer_to_probes_for_the_patience_is_a_hang():
    dog = ApiWatchdog(probe_every=3, patience=7)
    dog.connected(0.0)
    now = 0.0
    while not dog.hung(now):
        if dog.probe_due(now):
            dog.probed(now)
            dog.sent(1, now)
        now += 0.5
    assert 10 < now <= 10.5  # first probe at 3 s, then 7 s of patience


def test_busy_but_answering_is_not_a_hang_however_much_is_owed():
    dog = ApiWatchdog(probe_every=3, patience=10)
    dog.connected(0.0)
    dog.sent(1000, 0.0)
    for step in range(1, 500):  # one answer every 0.1 s: slow, but alive
        dog.answered(step * 0.1)
        assert not dog.hung(step * 0.1)
    assert dog.owed == 501


def test_a_command_never_answered_costs_a_probe_not_a_restart():
    dog = ApiWatchdog(probe_every=3, patience=10)
    dog.connected(0.0)
    dog.sent(1, 0.0)  # never answered
    now = 0.0
    for _ in range(200):
        now += 0.5
        if dog.probe_due(now):
            dog.probed(now)
            dog.sent(1, now)
            dog.answered(now + 0.01)  # the probe is
        assert not dog.hung(now)
    assert dog.deadline() > now - 3
