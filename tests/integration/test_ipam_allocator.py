"""The allocator against a real etcd."""

from __future__ import annotations

import ipaddress

import pytest

from fabric.model.handles import Exhausted, IpamError
from fabric.model.pools import PoolError, parse_pool
from fabric.store import keys
from fabric.store.errors import CorruptValue
from ipam.allocator import Ipam, KeyPresent


@pytest.fixture
def ipam(store):
    return Ipam(store)


def test_pools_add_list_overlap(ipam):
    ipam.add_pool(parse_pool("default", "10.244.0.0/16"))
    with pytest.raises(PoolError, match="overlaps pool 'default'"):
        ipam.add_pool(parse_pool("other", "10.244.4.0/24"))
    ipam.add_pool(parse_pool("v6", "fd00:244::/64"))
    assert [p.name for p in ipam.pools()] == ["default", "v6"]


def test_allocate_is_idempotent_per_handle(ipam):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    first = ipam.allocate("c1.eth0", "node-a")
    again = ipam.allocate("c1.eth0", "node-a")
    other = ipam.allocate("c2.eth0", "node-a")
    assert first.allocations == again.allocations
    assert first.allocations[0].address != other.allocations[0].address
    assert first.allocations[0].block == "10.244.0.0/26"
    assert not first.allocations[0].borrowed
    assert [b.cidr for b in ipam.blocks_of("node-a")] == ["10.244.0.0/26"]


def test_full_block_claims_next_then_borrows_then_exhausts(ipam, store):
    ipam.add_pool(parse_pool("small", "10.9.0.0/29", 30))  # two blocks of 4
    a = [ipam.allocate(f"a{i}.eth0", "node-a").allocations[0] for i in range(4)]
    assert {x.block for x in a} == {"10.9.0.0/30"}
    b = [ipam.allocate(f"b{i}.eth0", "node-b").allocations[0] for i in range(3)]
    assert {x.block for x in b} == {"10.9.0.4/30"}
    # node-a's block is full and no free block is left: it borrows from node-b's.
    borrowed = ipam.allocate("a4.eth0", "node-a").allocations[0]
    assert borrowed.borrowed and borrowed.block == "10.9.0.4/30"
    assert store.get(keys.borrowed("node-a", borrowed.address)) is not None
    with pytest.raises(Exhausted, match="no free address left for node node-a"):
        ipam.allocate("a5.eth0", "node-a")
    held = [x.address for x in a + b] + [borrowed.address]
    assert len(set(held)) == 8


def test_strict_affinity_never_borrows(ipam):
    ipam.add_pool(parse_pool("strict", "10.9.0.0/29", 30, strict_affinity=True))
    for i in range(4):
        ipam.allocate(f"a{i}.eth0", "node-a")
    ipam.allocate("b0.eth0", "node-b")
    with pytest.raises(Exhausted):
        ipam.allocate("a9.eth0", "node-a")


def test_release_by_handle_and_address(ipam, store):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    one = ipam.allocate("c1.eth0", "n").allocations[0]
    two = ipam.allocate("c2.eth0", "n").allocations[0]
    assert ipam.release("c1.eth0") == [one.address]
    assert ipam.release("c1.eth0") == []  # already free: not an error
    assert ipam.release_address(two.address) == "c2.eth0"
    assert ipam.release_address(two.address) is None
    assert store.get(keys.handle("c2.eth0")) is None
    with pytest.raises(IpamError, match="not inside any IP pool"):
        ipam.release_address("192.0.2.1")
    # The block stays with its host after its last address is released...
    assert [b.cidr for b in ipam.blocks_of("n")] == ["10.244.0.0/26"]
    # ...until the host leaves the fabric.
    assert ipam.release_empty_blocks("n") == ["10.244.0.0/26"]
    assert ipam.blocks_of("n") == []
    assert store.keys(keys.affinity_prefix("n")) == []


def test_empty_block_release_keeps_used_blocks(ipam):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    ipam.allocate("c1.eth0", "n")
    assert ipam.release_empty_blocks("n") == []
    assert len(ipam.blocks_of("n")) == 1


def test_dual_stack(ipam):
    ipam.add_pool(parse_pool("v4", "10.244.0.0/24"))
    ipam.add_pool(parse_pool("v6", "fd00:244::/120"))
    handle = ipam.allocate("c1.eth0", "n", families=(4, 6))
    versions = sorted(ipaddress.ip_address(a.address).version for a in handle.allocations)
    assert versions == [4, 6]
    assert ipam.allocate("c1.eth0", "n", families=(4, 6)) == handle
    assert sorted(ipam.release("c1.eth0")) == sorted(a.address for a in handle.allocations)


def test_pool_selection_and_disabled(ipam):
    ipam.add_pool(parse_pool("a", "10.1.0.0/24"))
    ipam.add_pool(parse_pool("b", "10.2.0.0/24"))
    got = ipam.allocate("c1.eth0", "n", pools=["b"]).allocations[0]
    assert got.pool == "b"
    ipam.update_pool("b", disabled=True)
    with pytest.raises(IpamError, match="no enabled IPv4 pool among b"):
        ipam.allocate("c2.eth0", "n", pools=["b"])


def test_remove_pool_refused_while_in_use_unless_forced(ipam, store):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    ipam.allocate("c1.eth0", "n")
    with pytest.raises(PoolError, match=r"1 address\(es\) in use"):
        ipam.remove_pool("default")
    assert not ipam.pools()[0].disabled  # a refused removal changes nothing
    result = ipam.remove_pool("default", force=True)
    assert (result.blocks_freed, result.addresses_released) == (1, 1)
    assert ipam.pools() == []
    assert store.keys(keys.ROOT + "ipam/") == []


@pytest.mark.parametrize("garbage", [b"{not json", b'["a list"]', b'{"cidr": 5}'])
def test_corrupt_block_does_not_stop_allocation(ipam, store, garbage):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    first = ipam.allocate("c1.eth0", "n").allocations[0]
    store._client.put(keys.block(first.block), garbage)
    # The unreadable block is skipped (and never reclaimed): a new block is claimed.
    second = ipam.allocate("c2.eth0", "n").allocations[0]
    assert second.block != first.block


@pytest.mark.parametrize("garbage", [b'{"v": 99}', b'"text"', b'{"v": 1, "handle": "bad.eth0", '
                                     b'"node": "n", "allocations": [{"address": "x"}]}'])
def test_corrupt_handle_names_the_key(ipam, store, garbage):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    store._client.put(keys.handle("bad.eth0"), garbage)
    with pytest.raises(CorruptValue, match=r"/l3fabric/v1/ipam/handles/bad.eth0"):
        ipam.allocate("bad.eth0", "n")
    assert ipam.allocate("good.eth0", "n").allocations


def test_invalid_handle(ipam):
    with pytest.raises(IpamError, match="invalid handle"):
        ipam.allocate("a/b", "n")


def test_retried_allocation_gets_its_address_back_when_the_pool_is_full(ipam):
    """A runtime retries ADD; the retry must not fail with "exhausted" even though the
    allocator's cached view assumes new handles (found by the model test)."""
    ipam.add_pool(parse_pool("tiny", "10.9.0.0/30", 30))
    held = [ipam.allocate(f"c{i}.eth0", "node-a").allocations[0].address for i in range(4)]
    again = ipam.allocate("c1.eth0", "node-a").allocations[0].address
    assert again == held[1]
    with pytest.raises(Exhausted):
        ipam.allocate("c9.eth0", "node-a")


def test_threads_of_one_process_share_a_node_without_duplicates(ipam):
    """The agent serves concurrent ADDs from threads; they must never share an address."""
    import threading

    ipam.add_pool(parse_pool("default", "10.244.0.0/24", 28))
    got: list[str] = []
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(12):
                record = ipam.allocate(f"t{worker}-{i}.eth0", "node-a")
                got.append(record.allocations[0].address)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == 96 and len(set(got)) == 96
    assert ipam.stats["lost_races"] == 0  # one process, one node: no self-inflicted races


def test_allocate_with_writes_extra_records_in_the_same_commit(ipam, store):
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    extra_key = f"{keys.ROOT}bench-extra/c1.eth0"

    def also_put(record):
        return [(extra_key, {"ips": list(record.addresses())})]

    done = ipam.allocate_with("c1.eth0", "node-a", also_put=also_put,
                              also_absent=[extra_key])
    extra, handle = store.get(extra_key), store.get(keys.handle("c1.eth0"))
    assert done.written and done.created
    assert extra.value["ips"] == list(done.record.addresses())
    assert extra.mod_revision == handle.mod_revision == done.revision  # one transaction
    # Again: the first attempt (the cached view assumes a new handle) builds a commit
    # that fails its compares, writing nothing; the handle's record comes back...
    again = ipam.allocate_with("c1.eth0", "node-a", also_put=also_put)
    assert again.record == done.record and not again.written
    # ...unless a key that must be absent exists: then nothing is written, and it says.
    with pytest.raises(KeyPresent):
        ipam.allocate_with("c2.eth0", "node-a", also_put=also_put, also_absent=[extra_key])
    assert store.get(keys.handle("c2.eth0")) is None
    assert store.get(extra_key).value == extra.value


def test_release_from_a_known_entry_in_one_transaction_or_the_usual_way(ipam, store):
    """The one-round-trip release guesses the address keys' revisions from the handle
    entry; a record that was rewritten since (a repair) fails the guess and is
    released the usual way, never left half released."""
    ipam.add_pool(parse_pool("default", "10.244.0.0/24"))
    ipam.add_pool(parse_pool("v6", "fd00:244::/64"))
    simple = ipam.allocate("c1.eth0", "node-a")
    dual = ipam.allocate("c2.eth0", "node-a", families=(4, 6))
    assert ipam.release("c1.eth0", known=store.get(keys.handle("c1.eth0"))) == \
        list(simple.addresses())
    assert ipam.release("c2.eth0", known=store.get(keys.handle("c2.eth0"))) == \
        list(dual.addresses())
    three = ipam.allocate("c3.eth0", "node-a")
    stale = store.get(keys.handle("c3.eth0"))
    ipam.update_pool("default", nat_outgoing=True)  # unrelated write: revisions move on
    store.put(keys.handle("c3.eth0"), stale.value)  # rewritten: create != mod revision
    assert ipam.release("c3.eth0", known=store.get(keys.handle("c3.eth0"))) == \
        list(three.addresses())
    assert store.keys(keys.IPS) == [] and store.keys(keys.HANDLES) == []


def test_a_handle_held_by_one_node_is_neither_given_nor_freed_by_another(ipam, store):
    """The same container ID on two hosts is two containers: the second must not get
    the first one's address, and a DEL on the second host must not free it."""
    from fabric.model.handles import HandleElsewhere

    ipam.add_pool(parse_pool("p", "10.244.0.0/16"))
    first = ipam.allocate("same.eth0", "n1")
    with pytest.raises(HandleElsewhere, match="held by node n1"):
        ipam.allocate("same.eth0", "n2")
    assert ipam.release("same.eth0", node="n2") == []
    assert ipam.handle("same.eth0") == first
    assert ipam.release("same.eth0", node="n1") == list(first.addresses())


def test_adopting_addresses_etcd_forgot_reserves_them_and_their_block(ipam, store):
    """After a restore from an older backup: an address a live container still uses is
    recorded again (its block too), so no second container gets it."""
    from fabric.model.handles import InUse

    ipam.add_pool(parse_pool("p", "10.244.0.0/24"))
    adopted = ipam.adopt("recovered.l3fabcdef", "n1", ["10.244.0.70"], {"recovered": "1"})
    assert adopted.allocations[0].block == "10.244.0.64/26"
    assert [b.affinity for b in ipam.blocks()] == ["n1"]
    given = {a for i in range(62) for a in ipam.allocate(f"c{i}.eth0", "n1").addresses()}
    assert "10.244.0.70" not in given
    with pytest.raises(InUse, match="held by c"):
        ipam.adopt("recovered.other", "n1", [sorted(given)[0]])
    assert ipam.handle("recovered.other") is None  # nothing written
    assert ipam.restore_block("10.244.0.64/26", "p", "n1") is False  # it exists
    store.delete(keys.block("10.244.0.64/26"))
    assert ipam.restore_block("10.244.0.64/26", "p", "n1") is True
    assert [b.cidr for b in ipam.blocks_of("n1")] == ["10.244.0.64/26"]
