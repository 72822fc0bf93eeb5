import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.model.blocks import Block
from fabric.model.pools import parse_pool
from ipam.blocks import (
    BlockUsage,
    address_at,
    block_cidr,
    block_containing,
    block_index,
    capacity,
    choose_ordinal,
    first_free_block,
    ordinal_of,
    pick_block,
    subnet_edges,
)

POOL = parse_pool("p", "10.244.0.0/24", 26)


def test_block_math():
    assert POOL.block_count == 4
    assert [block_cidr(POOL, i) for i in range(4)] == [
        "10.244.0.0/26", "10.244.0.64/26", "10.244.0.128/26", "10.244.0.192/26"]
    assert block_containing(POOL, "10.244.0.130") == "10.244.0.128/26"
    assert block_index(POOL, "10.244.0.192/26") == 3
    assert capacity("10.244.0.0/26") == 64
    assert address_at("10.244.0.64/26", 5) == "10.244.0.69"
    assert ordinal_of("10.244.0.64/26", "10.244.0.69") == 5


def test_ipv6_block_math():
    pool = parse_pool("v6", "fd00::/120")
    assert pool.block_count == 4
    assert block_cidr(pool, 1) == "fd00::40/122"
    assert address_at("fd00::40/122", 1) == "fd00::41"


def test_first_free_block_skips_claimed_and_ends():
    assert first_free_block(POOL, []) == "10.244.0.0/26"
    assert first_free_block(POOL, ["10.244.0.0/26", "10.244.0.128/26"]) == "10.244.0.64/26"
    assert first_free_block(POOL, [block_cidr(POOL, i) for i in range(4)]) is None


def test_pick_block_prefers_fullest_with_room():
    def usage(cidr, used):
        return BlockUsage(Block(cidr, "p", "n"), 1, frozenset(used))
    full = usage("10.244.0.0/26", range(64))
    half = usage("10.244.0.64/26", range(32))
    empty = usage("10.244.0.128/26", [])
    assert pick_block([empty, full, half]) is half
    assert pick_block([full]) is None


@given(st.integers(1, 64).flatmap(
    lambda size: st.tuples(st.just(size), st.sets(st.integers(0, size - 1)))),
    st.integers(0, 2**32))
def test_choose_ordinal_never_returns_a_used_one(size_used, seed):
    size, used = size_used
    pick = choose_ordinal(size, used, random.Random(seed))
    if len(used) == size:
        assert pick is None
    else:
        assert pick is not None and 0 <= pick < size and pick not in used


@given(st.lists(st.sampled_from(["alloc", "free"]), min_size=1, max_size=300),
       st.integers(0, 2**32))
def test_sequence_of_choices_never_hands_out_twice(ops, seed):
    """Model the allocator's bookkeeping: every address held by exactly one holder."""
    rng = random.Random(seed)
    used: set[int] = set()
    held: list[int] = []
    for op in ops:
        if op == "alloc":
            pick = choose_ordinal(64, used, rng)
            if pick is None:
                assert len(used) == 64
                continue
            assert pick not in used
            used.add(pick)
            held.append(pick)
        elif held:
            used.discard(held.pop(rng.randrange(len(held))))
    assert len(held) == len(set(held)) == len(used)


@pytest.mark.parametrize("cidr, edges", [
    ("10.0.0.0/26", {0, 63}), ("10.0.0.4/30", {0, 3}), ("10.0.0.4/31", set()),
    ("10.0.0.4/32", set()), ("fd00::/122", {0}), ("fd00::/127", set()),
])
def test_subnet_edges_are_what_a_host_on_the_block_as_a_subnet_cannot_have(cidr, edges):
    assert subnet_edges(cidr) == edges
