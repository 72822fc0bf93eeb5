"""Datastore._call with several etcd endpoints: a member that went silent (powered off)
costs the call its timeout once, then the call goes on to the other members."""

from __future__ import annotations

import etcd3
import pytest

from fabric.settings import EtcdSettings, parse_endpoints
from fabric.store import datastore
from fabric.store.datastore import Datastore, Unavailable

THREE = "http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379"


def store(endpoints: str) -> Datastore:
    return Datastore(client=None, settings=EtcdSettings(endpoints=parse_endpoints(endpoints)))  # type: ignore[arg-type]


def flaky(failures: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> int:
        calls.append(1)
        if len(calls) <= failures:
            raise etcd3.exceptions.ConnectionTimeoutError()
        return 42
    return calls, fn


def test_a_call_whose_first_attempt_used_up_the_patience_still_tries_the_others(monkeypatch):
    # The first attempt waited out the call timeout on a silent member: no patience left.
    monkeypatch.setattr(datastore, "FAILOVER_PATIENCE", 0.0)
    monkeypatch.setattr(datastore.time, "sleep", lambda _: None)
    calls, fn = flaky(2)
    assert store(THREE)._call(fn) == 42
    assert len(calls) == 3


def test_it_gives_up_after_one_attempt_per_member_when_none_answers(monkeypatch):
    monkeypatch.setattr(datastore, "FAILOVER_PATIENCE", 0.0)
    monkeypatch.setattr(datastore.time, "sleep", lambda _: None)
    calls, fn = flaky(10)
    with pytest.raises(Unavailable):
        store(THREE)._call(fn)
    assert len(calls) == 3


def test_one_endpoint_one_attempt():
    calls, fn = flaky(1)
    with pytest.raises(Unavailable):
        store("http://10.0.0.1:2379")._call(fn)
    assert len(calls) == 1
