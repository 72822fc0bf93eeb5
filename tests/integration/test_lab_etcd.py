"""etcd started again in the same directory: after a kill -9 (stale socket file) and
while another etcd still serves there (its socket must be left alone)."""

from __future__ import annotations

import signal

import pytest

from fabric.lab.etcd import EtcdError, EtcdServer
from fabric.processes import kill_pid
from fabric.settings import EtcdSettings, parse_endpoints
from fabric.store.datastore import Datastore
from tests.conftest import PREFIX


def answers(server: EtcdServer) -> bool:
    """A write and a read through the unix socket, which tools outside a lab use."""
    store = Datastore.connect(EtcdSettings(endpoints=parse_endpoints(server.unix_endpoint)))
    try:
        store.put("/cli-test/probe", {"pid": server.pid})
        entry = store.get("/cli-test/probe")
        return entry is not None and entry.value == {"pid": server.pid}
    finally:
        store.close()


def test_etcd_starts_again_after_kill_9_in_the_same_directory(tmp_path):
    first = EtcdServer.start(tmp_path, name=f"{PREFIX}-etcd-a")
    try:
        kill_pid(first.pid, sig=signal.SIGKILL)
        assert (tmp_path / "etcd:2379").exists()  # what a crash leaves behind
        second = EtcdServer.start(tmp_path, name=f"{PREFIX}-etcd-a")
    finally:
        first.stop()
    try:
        assert answers(second)
    finally:
        second.stop()


def test_a_live_etcd_socket_is_not_taken_over(tmp_path):
    first = EtcdServer.start(tmp_path, name=f"{PREFIX}-etcd-b")
    try:
        with pytest.raises(EtcdError, match="already serving"):
            EtcdServer.start(tmp_path, name=f"{PREFIX}-etcd-b", timeout=10)
        assert answers(first)
    finally:
        first.stop()
