"""fabricctl against records another writer left unreadable (by hand with etcdctl, or
another version): listings show the rest and say what was skipped, and the bad record
can be removed with the command that removes its kind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fabric.model.nodes import Node, Workload
from fabric.model.peers import PeerSpec
from fabric.model.pools import parse_pool
from fabric.store import keys

FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]


@pytest.fixture
def ctl(etcd_server):
    def run(*argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*FABRICCTL, "--etcd-endpoints", etcd_server.endpoint, *argv],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expect, (argv, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result
    return run


@pytest.fixture
def records(store):
    store.put(keys.node("good"), Node("good", "192.0.2.1", 64512).to_record())
    store.put(keys.node("bad"), {"name": "bad", "asn": 1e300})
    store.put(keys.pool("good"), parse_pool("good", "10.244.0.0/16").to_record())
    store.put(keys.pool("bad"), {"name": "bad", "cidr": "10.250.0.0/16", "block_size": 26.5})
    store.put(keys.bgp_peer("good"), PeerSpec("good", "192.0.2.50", 65001).to_record())
    store.put(keys.bgp_peer("bad"), {"name": "bad", "address": "192.0.2.51", "asn": 65001,
                                     "password": "two words"})
    store.put(keys.workload("good", "c.eth0"),
              Workload("c.eth0", "good", "c", "eth0", "/run/netns/c", ("10.244.0.1",),
                       "c", "l3fc").to_record())
    store.put(keys.workload("good", "d.eth0"), {"handle": "d.eth0", "node": "good",
                                                  "ips": ["10.244.0.2"], "name": ["x"]})


@pytest.mark.parametrize("argv, shown", [
    (("nodes",), "good"), (("ipam", "pool", "list"), "good"), (("bgp", "peer", "list"), "good"),
    (("workloads",), "10.244.0.1"), (("ipam", "show"), "10.244.0.0/16"),
])
def test_listings_show_the_readable_records_and_name_the_others(ctl, records, argv, shown):
    result = ctl(*argv)
    assert shown in result.stdout
    assert "bad" not in result.stdout and "10.244.0.2" not in result.stdout
    assert "unreadable" in result.stderr  # and says what it left out


def test_unreadable_records_are_removed_by_the_command_for_their_kind(ctl, records, store):
    ctl("ipam", "pool", "rm", "bad")
    ctl("bgp", "peer", "rm", "bad")
    ctl("node", "rm", "bad")
    assert store.get(keys.pool("bad")) is None
    assert store.get(keys.bgp_peer("bad")) is None
    assert store.get(keys.node("bad")) is None
    assert store.get(keys.pool("good")) is not None
