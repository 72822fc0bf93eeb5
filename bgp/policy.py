"""Import policy: which received routes may reach the kernel. Pure.

A fabric node trusts BGP only for what etcd says can exist: prefixes inside an
enabled IP pool, never a default route, never anything covering an underlay address
(a route to a peer through itself would take the session down), never a path that
already went through our AS (ExaBGP does no loop detection: an eBGP ToR echoes our
own routes back), never our own blocks, never a reflected route that went through our
cluster or names us as its originator (RFC 4456 8: ExaBGP does not check those
either). A claimed block or a borrowed address is only
accepted from where etcd says it lives: with an empty AS path the next hop must be
its node; through other ASes the path must originate in its node's AS. Everything
rejected keeps its reason, for counters and `fabricctl bgp routes --rejected`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fabric.model.prefix import Prefix, address_int

DEFAULT_ROUTE = "default-route"
OUTSIDE_POOLS = "outside-pools"
UNDERLAY = "underlay-address"
AS_LOOP = "as-path-loop"
OWN_BLOCK = "own-block"
NOT_BORROWED = "not-borrowed"
NEXT_HOP = "next-hop-mismatch"
ORIGIN = "origin-mismatch"
MAX_PREFIX = "max-prefix"
BAD_PREFIX = "malformed-prefix"
CLUSTER_LOOP = "cluster-list-loop"
ORIGINATOR_LOOP = "originator-is-us"
REASONS = (DEFAULT_ROUTE, OUTSIDE_POOLS, UNDERLAY, AS_LOOP, OWN_BLOCK, NOT_BORROWED,
           NEXT_HOP, ORIGIN, MAX_PREFIX, BAD_PREFIX, CLUSTER_LOOP, ORIGINATOR_LOOP)


@dataclass(frozen=True)
class Origin:
    """Where etcd says a block or borrowed address lives: its node's addresses and AS."""

    node: str
    address: str  # the node's IPv4 underlay address ("" when it has none)
    asn: int
    address6: str = ""  # its IPv6 underlay address ("" when it has none)

    def next_hop(self, family: int) -> str:
        return self.address6 if family == 6 else self.address


@dataclass(frozen=True)
class PolicyContext:
    local_as: int
    pools: tuple[tuple[Prefix, int], ...] = ()  # enabled pools with their block size
    own_blocks: tuple[Prefix, ...] = ()
    underlay: frozenset[tuple[int, int]] = frozenset()  # (family, address int)
    blocks: Mapping[Prefix, Origin] = field(default_factory=dict)
    borrowed: Mapping[Prefix, Origin] = field(default_factory=dict)
    router_id: str = ""  # ours (a reflected route naming it came from us)
    cluster_id: str = ""  # ours when we reflect ("": we are no reflector)
    underlay_nets: tuple[Prefix, ...] = ()  # the nodes' own segments
    # (family, prefix length) -> the underlay addresses cut to that length: one set
    # lookup per route instead of a walk over every node (filled as lengths come up).
    _underlay_nets: dict[tuple[int, int], frozenset[int]] = field(
        default_factory=dict, compare=False, repr=False)

    def covers_underlay(self, prefix: Prefix) -> bool:
        key = (prefix.family, prefix.length)
        nets = self._underlay_nets.get(key)
        if nets is None:
            shift = prefix.bits - prefix.length
            nets = frozenset(a >> shift for f, a in self.underlay if f == prefix.family)
            self._underlay_nets[key] = nets
        return (prefix.network >> (prefix.bits - prefix.length)) in nets

    @classmethod
    def build(cls, local_as: int, pools: Iterable[tuple[str, int]],
              own_blocks: Iterable[str], underlay: Iterable[str],
              blocks: Mapping[str, Origin], borrowed: Mapping[str, Origin],
              router_id: str = "", cluster_id: str = "",
              underlay_nets: Iterable[Prefix] = ()) -> PolicyContext:
        return cls(local_as,
                   tuple((Prefix.parse(c), size) for c, size in pools),
                   tuple(Prefix.parse(b) for b in own_blocks),
                   frozenset(address_int(a) for a in underlay),
                   {Prefix.parse(k): v for k, v in blocks.items()},
                   {Prefix.parse(k): v for k, v in borrowed.items()},
                   router_id, cluster_id, tuple(underlay_nets))


def _inside(inner: Prefix, outer: Prefix) -> bool:
    """`outer` contains `inner` (the hot test: twice or more per received route)."""
    family, network, length = outer
    if inner[0] != family or inner[2] < length:
        return False
    shift = (128 if family == 6 else 32) - length
    return (inner[1] >> shift) == (network >> shift)


def evaluate(prefix: Prefix, next_hop: str, as_path: tuple[int, ...],
             ctx: PolicyContext, originator: str = "",
             cluster_list: tuple[str, ...] = ()) -> str | None:
    """None when the route is accepted, else the reason it is not. `originator` is the
    route's ORIGINATOR_ID attribute when it has one."""
    if prefix.length == 0:
        return DEFAULT_ROUTE
    if cluster_list and ctx.cluster_id in cluster_list:
        return CLUSTER_LOOP
    if originator and originator == ctx.router_id:
        return ORIGINATOR_LOOP
    block_size = None
    for pool, size in ctx.pools:
        if _inside(prefix, pool):
            block_size = size
            break
    if block_size is None:
        return OUTSIDE_POOLS
    if ctx.covers_underlay(prefix):
        return UNDERLAY
    for net in ctx.underlay_nets:
        if _inside(prefix, net) or _inside(net, prefix):
            return UNDERLAY
    if ctx.local_as in as_path:
        return AS_LOOP
    origin = ctx.borrowed.get(prefix) if prefix.length == prefix.bits else None
    if origin is None:
        for own in ctx.own_blocks:
            if _inside(prefix, own) or _inside(own, prefix):
                return OWN_BLOCK
        origin = ctx.blocks.get(prefix)
        if origin is None and prefix.length > block_size:
            # Inside a claimed block but not a known borrowed address: a more specific
            # route that would steal part of another node's block.
            drop = prefix.bits - block_size
            containing = Prefix(prefix.family, (prefix.network >> drop) << drop, block_size)
            if containing in ctx.blocks:
                return NOT_BORROWED
    if origin is not None:
        if not as_path:
            if next_hop != origin.next_hop(prefix.family):
                return NEXT_HOP
        elif as_path[-1] != origin.asn:
            return ORIGIN
    return None
