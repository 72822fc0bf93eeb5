"""Block math and the pure choices of the allocator.

A pool is cut into equal blocks (default /26). A host claims whole blocks (affinity)
and announces each as one route, so the routing table grows with hosts, not with
containers. Addresses inside a block are numbered by ordinal (0 = the block's first
address); the allocator stores one etcd key per used ordinal.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from fabric.model.blocks import Block
from fabric.model.pools import Pool


def block_cidr(pool: Pool, index: int) -> str:
    """The `index`-th block of `pool`."""
    if not 0 <= index < pool.block_count:
        raise IndexError(f"pool {pool.name} has {pool.block_count} blocks, not {index + 1}")
    step = 1 << (pool.network.max_prefixlen - pool.block_size)
    first = int(pool.network.network_address) + index * step
    return f"{ipaddress.ip_address(first)}/{pool.block_size}"


def block_index(pool: Pool, cidr: str) -> int:
    net = ipaddress.ip_network(cidr)
    step = 1 << (pool.network.max_prefixlen - pool.block_size)
    return (int(net.network_address) - int(pool.network.network_address)) // step


def block_containing(pool: Pool, address: str) -> str:
    ip = ipaddress.ip_address(address)
    host_bits = pool.network.max_prefixlen - pool.block_size
    first = (int(ip) >> host_bits) << host_bits
    return f"{ipaddress.ip_address(first)}/{pool.block_size}"


def capacity(cidr: str) -> int:
    net = ipaddress.ip_network(cidr)
    return 1 << (net.max_prefixlen - net.prefixlen)


def address_at(cidr: str, ordinal: int) -> str:
    net = ipaddress.ip_network(cidr)
    if not 0 <= ordinal < capacity(cidr):
        raise IndexError(f"ordinal {ordinal} outside block {cidr}")
    return str(ipaddress.ip_address(int(net.network_address) + ordinal))


def ordinal_of(cidr: str, address: str) -> int:
    net = ipaddress.ip_network(cidr)
    ip = ipaddress.ip_address(address)
    if ip not in net:
        raise ValueError(f"{address} is not in block {cidr}")
    return int(ip) - int(net.network_address)


def subnet_edges(cidr: str) -> frozenset[int]:
    """The ordinals a container cannot have when its address is put on its interface
    with the block's prefix length (what l3fabric-ipam gives another main plugin, ptp or
    bridge, so that it has a subnet route to replace): the block's network address
    and, for IPv4, its broadcast address (a reply to it is a broadcast, and a packet
    from it a martian; the ping test between two ptp containers failed whenever one
    got the block's last address). For IPv6, the subnet-router anycast address. A /31
    or /127 has neither (RFC 3021, RFC 6164); a /32 or /128 block only its one address."""
    net = ipaddress.ip_network(cidr)
    host_bits = net.max_prefixlen - net.prefixlen
    if host_bits <= 1:
        return frozenset()
    return frozenset({0} if net.version == 6 else {0, (1 << host_bits) - 1})


def first_free_block(pool: Pool, claimed: Collection[str]) -> str | None:
    """The lowest block of the pool nobody has claimed, or None when all are taken.

    Lowest-first keeps claimed blocks dense, which keeps `ipam show` readable and makes
    an aggregate announcement possible later.
    """
    taken = {block_index(pool, c) for c in claimed}
    for index in range(pool.block_count):
        if index not in taken:
            return block_cidr(pool, index)
    return None


def choose_ordinal(size: int, used: Collection[int], rng: random.Random) -> int | None:
    """A free ordinal picked at random.

    Random, not lowest-first, so that concurrent allocators on the same host rarely
    race for the same key, and a just-released address is unlikely to be reused at
    once (a stale ARP/conntrack entry elsewhere then points at nothing, not at a
    stranger).
    """
    free_count = size - len(used)
    if free_count <= 0:
        return None
    if free_count > size // 4:
        while True:  # mostly free: rejection sampling is O(1) expected
            pick = rng.randrange(size)
            if pick not in used:
                return pick
    free = [i for i in range(size) if i not in used]
    return rng.choice(free)


@dataclass(frozen=True)
class BlockUsage:
    """A block and the ordinals in use in it, as read in one round."""

    block: Block
    mod_revision: int
    used: frozenset[int]

    @property
    def size(self) -> int:
        return capacity(self.block.cidr)

    @property
    def free(self) -> int:
        return self.size - len(self.used)


def pick_block(candidates: Iterable[BlockUsage]) -> BlockUsage | None:
    """The fullest block that still has room.

    Filling the fullest first packs workloads into few blocks, so blocks empty out and
    can be given back when their host leaves.
    """
    open_blocks = [c for c in candidates if c.free > 0]
    if not open_blocks:
        return None
    return min(open_blocks, key=lambda c: (c.free, c.block.cidr))
