"""When ExaBGP is told to reload: never before its API is up, again until it confirms."""

from __future__ import annotations

from bgp.reload import CONFIRMED, REFUSED, ReloadGate

LOADED = f"12:00:00 | 1 | reactor | {CONFIRMED}"


def test_a_reload_requested_before_the_api_connects_is_sent_when_it_does():
    gate = ReloadGate()
    gate.spawned()
    assert gate.request(0.01) is False  # 10 ms after spawn: not yet, and not lost
    assert gate.api_connected(0.5) is True
    assert gate.log_line(LOADED, 0.6) == (True, False)
    assert gate.deadline() is None


def test_a_new_process_reads_the_file_itself():
    gate = ReloadGate()
    gate.spawned()
    assert gate.api_connected(0.5) is False  # nothing changed since it started


def test_exabgps_own_start_up_load_is_not_taken_for_ours():
    gate = ReloadGate()
    gate.spawned()
    gate.request(0.0)
    assert gate.log_line(LOADED, 0.3) == (None, False)  # before we asked (API not up)
    assert gate.api_connected(0.5) is True


def test_an_unconfirmed_reload_is_asked_again_with_back_off():
    gate = ReloadGate(retry=1.0, max_retry=4.0)
    gate.api_connected(0.0)
    assert gate.request(10.0) is True
    assert gate.poll(10.9) is False
    assert gate.poll(11.0) is True  # dropped by a busy ExaBGP: again
    assert gate.poll(12.9) is False  # now waits 2 s
    assert gate.poll(13.0) is True
    assert gate.deadline() == 17.0  # then 4 s, the most
    assert gate.log_line(LOADED, 13.5) == (True, False)
    assert gate.poll(100.0) is False


def test_changes_during_a_reload_make_one_more():
    gate = ReloadGate()
    gate.api_connected(0.0)
    assert gate.request(1.0) is True
    assert gate.request(1.1) is False and gate.request(1.2) is False
    assert gate.log_line(LOADED, 1.5) == (True, True)  # one more, not two
    assert gate.log_line(LOADED, 2.0) == (True, False)


def test_a_refused_configuration_is_not_retried():
    gate = ReloadGate()
    gate.api_connected(0.0)
    gate.request(1.0)
    assert gate.log_line(f"x | {REFUSED}", 1.2) == (False, False)
    assert gate.poll(50.0) is False


def test_a_reload_lost_with_the_connection_is_sent_on_the_next_one():
    gate = ReloadGate()
    gate.api_connected(0.0)
    assert gate.request(1.0) is True
    gate.api_lost()
    assert gate.api_connected(2.0) is True
