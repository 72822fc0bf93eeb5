"""Model-based test of the allocator against real etcd: any sequence of allocations
and releases from several nodes keeps every address with at most one handle, and the
store agrees with a simple model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fabric.model.handles import Exhausted, HandleElsewhere
from fabric.model.pools import parse_pool
from fabric.store.datastore import Datastore
from fabric.store.keys import ROOT
from ipam.allocator import Ipam
from ipam.check import check

HANDLES = st.sampled_from([f"h{i}.eth0" for i in range(12)])
NODES = st.sampled_from(["n1", "n2", "n3"])


@pytest.fixture
def machine_class(etcd_settings):
    class IpamMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store = Datastore.connect(etcd_settings)
            self.store.delete_prefix(ROOT)
            self.ipam = Ipam(self.store)
            # 12 addresses in /30 blocks: exhaustion and borrowing happen quickly.
            self.ipam.add_pool(parse_pool("m", "10.60.0.0/29", 30))
            self.ipam.add_pool(parse_pool("m2", "10.60.0.8/30", 30, strict_affinity=True))
            self.model: dict[str, str] = {}
            self.owner: dict[str, str] = {}  # handle -> the node holding it

        @rule(handle=HANDLES, node=NODES)
        def allocate(self, handle, node):
            try:
                got = self.ipam.allocate(handle, node).allocations[0].address
            except HandleElsewhere:
                # One container is on one node: its handle is held by another one.
                assert handle in self.model and self.owner[handle] != node
                return
            except Exhausted:
                # Only when the borrowable pool is full and the strict one is either
                # full or another node's.
                in_m = [a for a in self.model.values() if int(a.split(".")[3]) < 8]
                assert len(in_m) == 8, "exhausted with room left in the borrowable pool"
                owners = {b.affinity for b in self.ipam.blocks() if b.pool == "m2"}
                in_m2 = len(self.model) - len(in_m)
                assert in_m2 == 4 or owners - {node}, "strict pool had room for this node"
                assert handle not in self.model
                return
            if handle in self.model:
                assert got == self.model[handle], "retried ADD got another address"
                assert self.owner[handle] == node
            assert got not in {a for h, a in self.model.items() if h != handle}
            self.model[handle] = got
            self.owner[handle] = node

        @rule(handle=HANDLES)
        def release(self, handle):
            freed = self.ipam.release(handle)
            assert freed == ([self.model.pop(handle)] if handle in self.model else [])

        @rule(handle=HANDLES)
        def release_by_address(self, handle):
            if handle in self.model:
                assert self.ipam.release_address(self.model.pop(handle)) == handle

        @invariant()
        def store_matches_model(self):
            snap = self.ipam.snapshot()
            held = {ip.address: ip.handle for ip in snap.ips}
            assert held == {a: h for h, a in self.model.items()}
            report = check(snap)
            assert not report.of("duplicate") and not report.of("dangling")

        def teardown(self):
            self.store.delete_prefix(ROOT)
            self.store.close()

    return IpamMachine


def test_allocator_matches_model(machine_class):
    state_machine_test = machine_class.TestCase
    state_machine_test.settings = settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck))
    state_machine_test().runTest()
