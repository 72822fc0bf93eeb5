"""Many CNI requests at once against one real agent: what a runtime starting or
stopping a batch of pods does. Requests for different containers run side by side in
the agent (allocation, veth work); nothing here is timed, only what they leave behind.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from fabric.kernel import links, netns
from fabric.kernel.netns import entered
from fabric.store import keys
from ipam.allocator import Ipam
from ipam.check import check
from tests.conftest import needs_root
from tests.integration.test_cni import (
    config,
    host_ns,
    lab,  # noqa: F401  (the module's lab fixture)
    links_in,
    plugin,
    store,  # noqa: F401
    wait_for,
)

pytestmark = [needs_root, pytest.mark.root]
COUNT = 20


@pytest.fixture
def many(lab):  # noqa: F811
    names = [f"{lab.name}-m{i}" for i in range(COUNT)]
    for name in names:
        netns.create(name)
    yield names
    for name in names:
        plugin(lab, "DEL", name)
        netns.remove(name)


def at_once(work, items):
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(work, items))


def test_twenty_adds_then_twenty_dels_at_once(lab, store, many):  # noqa: F811
    ns = lab.state.hosts["h1"].netns
    added = at_once(lambda name: plugin(lab, "ADD", name), many)
    assert all(o.ok for o in added), [o.stdout for o in added if not o.ok]
    addresses = [o.document["ips"][0]["address"].split("/")[0] for o in added]
    assert len(set(addresses)) == COUNT
    # Every container is wired and registered as if it had been added alone.
    for name, address in zip(many, addresses, strict=True):
        host_if = links.host_ifname(f"{name}.eth0")
        with entered(host_ns(lab)):
            assert links.inspect(host_if, netns.path(name), "eth0", [address]) == []
        assert store.get(keys.workload("h1", f"{name}.eth0")).value["ips"] == [address]
    assert lab.ping(many[0], addresses[-1], count=1)
    report = check(Ipam(store).snapshot())
    assert report.counts["duplicate"] == 0

    deleted = at_once(lambda name: plugin(lab, "DEL", name), many)
    assert all(o.ok for o in deleted), [o.stdout for o in deleted if not o.ok]
    # DEL answers once traffic has stopped; the pairs go in one deletion shortly after.
    ours = {links.host_ifname(f"{name}.eth0") for name in many}
    wait_for(lambda: not ours & set(links_in(ns)), "every detached pair is deleted")
    assert not any(k for k in store.keys(keys.HANDLES) if f"{lab.name}-m" in k)
    assert not any(k for k in store.keys(keys.WORKLOADS) if f"{lab.name}-m" in k)
    routes = subprocess.run(["ip", "-n", ns, "route", "show", "proto", "73"],
                            capture_output=True, text=True).stdout
    assert not any(a + " " in routes for a in addresses)


def test_readd_while_the_old_pair_waits_for_deletion(lab, store, many):  # noqa: F811
    """A DEL leaves its pair down in the doomed group for a moment; an ADD of the same
    container interface meanwhile gets a fresh, working pair that the deletion of the
    group leaves alone."""
    name = many[0]
    first = plugin(lab, "ADD", name)
    assert first.ok, first.stdout
    assert plugin(lab, "DEL", name).ok
    again = plugin(lab, "ADD", name)
    assert again.ok, again.stdout
    address = again.document["ips"][0]["address"].split("/")[0]
    host_if = links.host_ifname(f"{name}.eth0")
    ns = lab.state.hosts["h1"].netns

    def up_and_ours() -> bool:
        shown = subprocess.run(["ip", "-n", ns, "-d", "link", "show", host_if],
                               capture_output=True, text=True).stdout
        return "state UP" in shown and f"group {links.DOOMED}" not in shown

    wait_for(up_and_ours, "the new pair is up and not doomed")
    subprocess.run(["sleep", "0.3"], check=True)  # past the group's deletion
    with entered(host_ns(lab)):
        assert links.inspect(host_if, netns.path(name), "eth0", [address]) == []
    check_ = plugin(lab, "CHECK", name, cfg=config(prevResult=again.document))
    assert check_.ok, check_.stdout


def test_concurrent_adds_leave_one_registration_each(lab, store, many):  # noqa: F811
    """Registration travels in the allocation's transaction: every handle that holds
    an address has its workload record, and the other way round."""
    added = at_once(lambda name: plugin(lab, "ADD", name), many[:10])
    assert all(o.ok for o in added)
    handles = {k.rsplit("/", 1)[1] for k in store.keys(keys.HANDLES)}
    registered = {k.rsplit("/", 1)[1] for k in store.keys(keys.workloads_prefix("h1"))}
    mine = {f"{name}.eth0" for name in many[:10]}
    assert mine <= handles and mine <= registered


def test_add_over_a_stale_registration_and_del_after_a_change_behind_our_back(
        lab, store, many):  # noqa: F811
    """ADD's one-transaction path compares the handle and the registration absent; a
    registration left behind sends it the long way (read, then decide). DEL's
    one-transaction release compares what ADD wrote; a handle changed since is read
    and released the long way."""
    from fabric.model.nodes import Workload

    stale, changed = many[0], many[1]
    store.put(
        keys.workload("h1", f"{stale}.eth0"),
        Workload(f"{stale}.eth0", "h1", "old", "eth0", "/gone", ("10.9.9.9",)).to_record())
    added = plugin(lab, "ADD", stale)
    assert added.ok, added.stdout
    address = added.document["ips"][0]["address"].split("/")[0]
    assert store.get(keys.workload("h1", f"{stale}.eth0")).value["ips"] == [address]

    assert plugin(lab, "ADD", changed).ok
    ipam = Ipam(store)
    held = ipam.handle(f"{changed}.eth0")
    ipam.drop_from_handle(f"{changed}.eth0", "192.0.2.1")  # no-op rewrite: new revision
    store.put(keys.handle(f"{changed}.eth0"), held.to_record())
    assert plugin(lab, "DEL", changed).ok
    assert ipam.handle(f"{changed}.eth0") is None
    assert store.get(keys.workload("h1", f"{changed}.eth0")) is None
    assert check(ipam.snapshot()).counts["duplicate"] == 0
