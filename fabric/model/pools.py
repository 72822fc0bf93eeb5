"""IP pools: what address space the fabric may hand out, and in what block size.

A pool is validated here, before it reaches etcd, so a bad CIDR or an impossible block
size is refused with a message that says which.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from fabric.model import checks
from fabric.model.nodes import Node
from fabric.model.peers import PeerSpec

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
# Smallest and largest block prefix length per family: a block must hold at least
# one address and at most 4096, so a host's block list stays short.
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PoolError(ValueError):
    """A pool definition we refuse; the message says what is wrong."""


@dataclass(frozen=True)
class Pool:
    name: str
    cidr: str
    block_size: int
    nat_outgoing: bool = False
    disabled: bool = False
    strict_affinity: bool = False
    network: Network = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "network", ipaddress.ip_network(self.cidr))

    @property
    def family(self) -> int:
        return self.network.version

    @cached_property
    def block_count(self) -> int:
        return 1 << (self.block_size - self.network.prefixlen)

    def contains(self, address: str) -> bool:
        return ipaddress.ip_address(address) in self.network

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("network")
        return record

    @classmethod
    def from_record(cls, value: dict[str, Any]) -> Pool:
        """Checked as `fabricctl ipam pool add` checks its input (PoolError, a
        ValueError, names what is wrong)."""
        value = checks.record(value)
        return parse_pool(checks.text(value.get("name"), "name"),
                          checks.text(value.get("cidr"), "cidr"),
                          checks.integer(value.get("block_size"), "block_size", 0, 128),
                          nat_outgoing=checks.flag(value.get("nat_outgoing"), "nat_outgoing"),
                          disabled=checks.flag(value.get("disabled"), "disabled"),
                          strict_affinity=checks.flag(value.get("strict_affinity"),
                                                      "strict_affinity"))


def parse_pool(name: str, cidr: str, block_size: int | None = None, *,
               nat_outgoing: bool = False, disabled: bool = False,
               strict_affinity: bool = False) -> Pool:
    """Validate user input and build a Pool, or raise PoolError naming the problem."""
    if not _NAME.fullmatch(name):
        raise PoolError(f"pool name {name!r}: use lower-case letters, digits, '-' and '.' "
                        "(at most 63 characters)")
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(cidr, strict=False)
            raise PoolError(f"pool CIDR {cidr!r} has host bits set; did you mean {loose}?"
                            ) from exc
        raise PoolError(f"pool CIDR {cidr!r} is not a valid network: {exc}") from exc
    special = _special(network)
    if special:
        raise PoolError(f"pool {network} overlaps {special}: containers cannot use those "
                        "addresses")
    family = network.version
    size = DEFAULT_BLOCK_SIZE[family] if block_size is None else int(block_size)
    low, high = BLOCK_SIZE_RANGE[family]
    if not low <= size <= high:
        raise PoolError(f"block size /{size} is out of range for IPv{family} "
                        f"(allowed /{low} to /{high})")
    if size < network.prefixlen:
        raise PoolError(f"block size /{size} is larger than the pool {network} itself")
    return Pool(name, str(network), size, nat_outgoing=nat_outgoing, disabled=disabled,
                strict_affinity=strict_affinity)


# Ranges no container address may come from (RFC 6890): each with why, for the error.
_SPECIAL = [(ipaddress.ip_network(n), why) for n, why in (
    ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
    ("127.0.0.0/8", "the loopback range 127.0.0.0/8"),
    ("169.254.0.0/16", "the link-local range 169.254.0.0/16 (the containers' gateway "
     "169.254.1.1 is there)"),
    ("224.0.0.0/4", "the multicast range 224.0.0.0/4"),
    ("240.0.0.0/4", "the reserved range 240.0.0.0/4 (and broadcast)"),
    ("::/127", "the unspecified and loopback addresses ::/127"),
    ("fe80::/10", "the link-local range fe80::/10"),
    ("ff00::/8", "the multicast range ff00::/8"),
)]


def _special(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    if network.prefixlen == 0:
        return "every address (a /0 pool would take the default route's place)"
    for special, why in _SPECIAL:
        if special.version == network.version and special.overlaps(network):
            return why
    return ""


def check_overlap(pool: Pool, existing: Iterable[Pool]) -> None:
    """Refuse a pool that shares addresses with another (or reuses its name)."""
    for other in existing:
        if other.name == pool.name:
            raise PoolError(f"a pool named {pool.name!r} already exists ({other.cidr})")
        if other.family == pool.family and other.network.overlaps(pool.network):
            raise PoolError(f"pool {pool.cidr} overlaps pool {other.name!r} ({other.cidr})")


def underlay_conflicts(pool: Pool, nodes: Iterable[Node], peers: Iterable[PeerSpec],
                       others: Iterable[tuple[str, str]] = ()) -> list[str]:
    """What in the underlay `pool` would swallow: each node or BGP peer whose own
    address lies inside it, each node's underlay network it overlaps (its gateway, its
    neighbours), and `others` (what, address: etcd's endpoints), as phrases naming
    them ("node h1 (10.99.0.11)").

    A host routes every block it owns to a blackhole (so unallocated addresses go
    nowhere) and other hosts route the block to that host: a block covering an
    underlay address cuts the hosts off from it, BGP sessions included. Addresses that
    do not parse are left out: they reach no one either.
    """
    found: list[str] = []
    nodes = list(nodes)
    named = [(f"node {n.name}", n.address) for n in nodes]
    named += [(f"BGP peer {p.name}", p.address) for p in peers]
    named += list(others)
    for node in nodes:
        for text in node.networks:
            network = ipaddress.ip_network(text)
            if network.version == pool.family and network.overlaps(pool.network) and \
                    f"underlay network {network}" not in " ".join(found):
                found.append(f"node {node.name}'s underlay network {network}")
    for what, address in named:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.version == pool.family and ip in pool.network:
            found.append(f"{what} ({address})")
    return found


def check_underlay(pool: Pool, nodes: Iterable[Node], peers: Iterable[PeerSpec],
                   others: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse a pool that overlaps the underlay (see `underlay_conflicts`)."""
    conflicts = underlay_conflicts(pool, nodes, peers, others)
    if conflicts:
        raise PoolError(f"pool {pool.cidr} overlaps {', '.join(conflicts)}: hosts would "
                        "route those addresses into the pool's blocks and lose them; choose "
                        "a range outside the underlay")


def pool_of(address: str, pools: Iterable[Pool]) -> Pool | None:
    ip = ipaddress.ip_address(address)
    for pool in pools:
        if ip.version == pool.family and ip in pool.network:
            return pool
    return None
