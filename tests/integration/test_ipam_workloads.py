"""Addresses of registered workloads, against a real etcd: `ipam release ADDRESS` does
not free one unless forced, `ipam check` compares registrations with what IPAM holds,
and `ipam release --leaked` leaves what needs a person alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fabric.model.handles import InUse
from fabric.model.nodes import Node, Workload
from fabric.model.pools import parse_pool
from fabric.store import keys
from fabric.store.datastore import Datastore, Read
from fabric.store.registry import RegistrationError, Registry
from ipam.allocator import Ipam
from ipam.check import check

FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]


@pytest.fixture
def ctl(etcd_server, store):
    def run(*argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*FABRICCTL, "--etcd-endpoints", etcd_server.endpoint, *argv],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expect, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result
    return run


@pytest.fixture
def ipam(store):
    ipam = Ipam(store)
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    store.put(keys.node("n1"), {"name": "n1", "address": "192.0.2.1", "asn": 64512})
    return ipam


def attach(ipam: Ipam, container: str, *ips: str) -> str:
    """Allocate for `container` and register it (listing `ips`, default its own)."""
    handle = f"{container}.eth0"
    address = ipam.allocate(handle, "n1").allocations[0].address
    Registry(ipam.store).register_workload(
        Workload(handle, "n1", container, "eth0", f"/run/netns/{container}", ips or (address,)))
    return address


def test_release_of_a_live_workload_address_is_refused(ctl, ipam, store):
    address = attach(ipam, "live")
    err = ctl("ipam", "release", address, expect=2).stderr
    assert f"{address} is in use by container live (handle live.eth0) on node n1" in err
    assert "--force" in err
    assert check(ipam.snapshot()).ok  # nothing was freed
    out = ctl("ipam", "release", address, "--force").stdout
    assert "was held by live.eth0" in out


def test_release_sees_a_workload_that_registers_meanwhile(etcd_settings, ipam, store):
    handle = "late.eth0"
    address = ipam.allocate(handle, "n1").allocations[0].address
    workload = Workload(handle, "n1", "late", "eth0", "/run/netns/late", (address,))

    class RegistersAfterReading(Datastore):
        """Real etcd; writes the registration right after release_address read it."""

        fired = False

        def read_many(self, reads):
            reads = list(reads)
            rows = super().read_many(reads)
            if not self.fired and any(isinstance(r, Read) and r.key.startswith(keys.WORKLOADS)
                                      for r in reads):
                self.fired = True
                self.put(keys.workload("n1", handle), workload.to_record())
            return rows

    racer = RegistersAfterReading.connect(etcd_settings)
    try:
        with pytest.raises(InUse, match="in use by container late"):
            Ipam(racer).release_address(address)
        assert racer.fired
    finally:
        racer.close()
    assert store.get(keys.handle(handle)) is not None


def test_check_finds_workloads_whose_address_ipam_does_not_hold(ctl, ipam, store):
    freed = attach(ipam, "freed")
    ipam.release_address(freed, force=True)  # what `release ADDRESS` used to do
    theirs = ipam.allocate("owner.eth0", "n1").allocations[0].address
    attach(ipam, "owner", theirs)
    attach(ipam, "thief", theirs)  # registered with an address another handle holds

    report = json.loads(ctl("-o", "json", "ipam", "check", expect=1).stdout)
    found = {(f["kind"], f["subject"], tuple(f["addresses"])) for f in report["findings"]}
    assert ("workload-unreserved", "freed.eth0", (freed,)) in found
    assert ("workload-conflict", "thief.eth0", (theirs,)) in found
    assert report["counts"]["workload-unreserved"] == 1
    assert report["counts"]["workload-conflict"] == 1
    table = ctl("ipam", "check", expect=1).stdout
    assert "workload-unreserved" in table and "workload-conflict" in table

    # --leaked leaves them to a person, and says so.
    before = check(ipam.snapshot())
    result = json.loads(ctl("-o", "json", "ipam", "release", "--leaked", expect=1).stdout)
    assert result["needs_attention"] >= 2
    after = check(ipam.snapshot())
    assert after.of("workload-unreserved") == before.of("workload-unreserved")
    assert after.of("workload-conflict") == before.of("workload-conflict")
    assert "--force applies to one ADDRESS" in ctl("ipam", "release", "--leaked", "--force",
                                                   expect=2).stderr


def test_release_leaked_keeps_an_orphan_address_its_workload_uses(ctl, ipam, store):
    address = attach(ipam, "lost")
    ipam.drop_from_handle("lost.eth0", address)  # the handle record loses it
    orphan, = check(ipam.snapshot()).of("orphan-ip")
    assert orphan.subject == address
    ctl("ipam", "release", "--leaked")
    assert store.keys(keys.IPS)  # the address key is still there
    assert check(ipam.snapshot()).of("orphan-ip") == [orphan]
    # Once the workload is gone, the orphan is freed.
    Registry(store).deregister_workload("n1", "lost.eth0")
    ctl("ipam", "release", "--leaked")
    assert store.keys(keys.IPS) == []


@pytest.mark.parametrize("bad", [{"handle": "x"}, {"node": "n1", "ips": 7}])
def test_a_registration_that_is_no_workload_record_is_written_again(ipam, store, bad):
    """The agent ignores a registration it cannot read; restoring the lost one must
    replace it, or the container's link stays unexplained for good."""
    address = attach(ipam, "c9")
    registry = Registry(store)
    record = registry.workload("n1", "c9.eth0")
    assert not registry.restore_workload(record)  # a usable one is there: left alone
    store.put(keys.workload("n1", "c9.eth0"), bad)
    assert registry.restore_workload(record)
    assert registry.workload("n1", "c9.eth0").ips == (address,)
    store.delete(keys.handle("c9.eth0"))  # no handle: nothing to restore
    store.delete(keys.workload("n1", "c9.eth0"))
    assert not registry.restore_workload(record)


@pytest.mark.parametrize("bad", [{"name": "n2", "asn": "x"}, {"name": "n2"}])
def test_an_own_node_record_that_is_no_node_record_is_replaced(store, bad):
    registry = Registry(store)
    store.put(keys.node("n2"), bad)
    registry.register_node(Node("n2", "192.0.2.2", 64512))
    assert store.get(keys.node("n2")).value["address"] == "192.0.2.2"
    with pytest.raises(RegistrationError, match=r"already registered by 192\.0\.2\.2"):
        registry.register_node(Node("n2", "192.0.2.3", 64512))
