"""The etcd-backed allocator: pools, block claims, allocation and release.

Every change is one etcd transaction whose compares make it safe against every other
writer, retried on conflict:

* an address is taken by creating its own key (`ipam/ips/<block>/<ordinal>`) with a
  "must not exist" compare, so two allocators can never hold the same address, and
  concurrent allocators in one block only collide when they pick the same ordinal;
* the same transaction compares the block record (still affine, not freed) and the
  pool record (not disabled or removed meanwhile), and writes the handle record;
* a block is freed only by a transaction that compares its ips prefix empty.

What an allocation decides on (the block it used last, with its used ordinals) is kept
between calls as a hint, and every commit compares what it relied on: a stale hint
costs a retry, never a duplicate. Allocations for one node in one process (the agent
serving concurrent CNI ADDs) run side by side: each reserves its ordinal in memory
before its commit, so they never race each other for one key, and only block scans
and claims, which would race each other for the same block, go one at a time.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fabric import logs
from fabric.model.blocks import Block
from fabric.model.handles import (
    Allocation,
    Exhausted,
    Handle,
    HandleElsewhere,
    InUse,
    IpamError,
    check_handle,
)
from fabric.model.nodes import Node, Workload
from fabric.model.peers import PeerSpec
from fabric.model.pools import Pool, PoolError, check_overlap, check_underlay, pool_of
from fabric.store import keys
from fabric.store.datastore import (
    Datastore,
    Entry,
    Listing,
    Read,
    absent,
    delete,
    delete_under,
    get_op,
    keys_op,
    list_op,
    parsed,
    prefix_empty,
    prefix_unchanged_since,
    put,
    readable,
    unchanged,
)
from fabric.store.errors import Conflict, CorruptValue
from ipam.blocks import (
    BlockUsage,
    address_at,
    block_containing,
    choose_ordinal,
    first_free_block,
    ordinal_of,
    pick_block,
    subnet_edges,
)
from ipam.check import IpOwner, Report, Snapshot

# etcd refuses transactions with more than 128 operations by default.
MAX_TXN_OPS = 128

T = TypeVar("T")
# Records to write in the same transaction as an allocation, given the handle's record
# as that transaction writes it: [(key, record)] (the CNI handler's registration).
AlsoPut = Callable[[Handle], Sequence[tuple[str, dict[str, Any]]]]



@dataclass(frozen=True)
class Allocated:
    """What `allocate_with` did."""

    record: Handle
    written: bool  # this record was committed by this call, with `also_put`'s records
    created: bool  # the handle did not exist before this call's commits
    revision: int = 0  # the revision of the commit that wrote `record` (when written)


class KeyPresent(Exception):
    """A key `allocate_with` was told must be absent exists: nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} exists")
        self.key = key


@dataclass(frozen=True)
class _Retry:
    """A compare failed (somebody wrote first). `rows`, when given, is a fresh view
    (see `_view_reads`) of `hinted` blocks read in the failed transaction itself."""

    hinted: list[str] = field(default_factory=list)
    rows: list[list[Entry | CorruptValue]] | None = None


@dataclass(frozen=True)
class PoolRemoval:
    pool: str
    blocks_freed: int
    addresses_released: int


class Ipam:
    """Address management for one fabric, over one Datastore."""

    def __init__(self, store: Datastore, *, rng: random.Random | None = None,
                 max_attempts: int = 100) -> None:
        self.store = store
        self.rng = rng or random.Random()
        self.max_attempts = max_attempts
        self.log = logs.get("ipam")
        # (node, family) -> the block allocated from last, and the view of it read
        # by the last commit. Hints only: every commit compares what it relies on.
        self._hints: dict[tuple[str, int], str] = {}
        self._views: dict[tuple[str, int],
                          tuple[str, list[list[Entry | CorruptValue]], float]] = {}
        # Ordinals chosen by commits of this process still in flight, per block: a
        # concurrent allocation in the same block picks another one, so allocations
        # of one node run side by side without racing each other for a key. Other
        # processes and hosts are kept apart by the compares alone.
        self._pending: dict[str, set[int]] = {}
        # Block scans and claims of one node go one at a time (two would claim two
        # blocks, or race for one); the common case, a commit in the hinted block,
        # never waits for another.
        self._node_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # the dicts above, stats
        # What allocation cost: commits, lost races, full scans, block claims (metrics).
        self.stats: Counter[str] = Counter()

    # -- pools -------------------------------------------------------------------------
    def pools(self) -> list[Pool]:
        return [p for p, _ in self._pool_entries()]

    def _pool_entries(self) -> list[tuple[Pool, Entry]]:
        listing = self.store.list(keys.POOLS)
        for bad in listing.corrupt:
            self.log.error("pool record unreadable", key=bad.key, reason=bad.reason)
        found = []
        for entry in listing.entries:  # one unreadable pool must not stop allocation
            try:
                found.append((_pool(entry), entry))
            except CorruptValue as exc:
                self.log.error("pool record unreadable", key=exc.key, reason=exc.reason)
        return sorted(found, key=lambda pe: pe[0].name)

    def add_pool(self, pool: Pool) -> None:
        """Add `pool` unless it overlaps another pool or swallows an underlay address.

        The pools, the registered nodes and the configured BGP peers are each listed,
        and the write compares each prefix unchanged since its listing: a node that
        registers, or a peer added, between the check and the write makes it retry.
        """
        for _ in range(self.max_attempts):
            listing = self.store.list(keys.POOLS)
            nodes = self.store.list(keys.NODES)
            peers = self.store.list(keys.BGP_PEERS)
            existing = readable(listing, Pool.from_record, "pool", self.log)
            check_overlap(pool, existing)
            for bad in listing.corrupt:  # a corrupt record still reserves its name
                if keys.last_segment(bad.key) == pool.name:
                    raise PoolError(f"a pool named {pool.name!r} exists but is unreadable "
                                    f"({bad.key})")
            check_underlay(pool, readable(nodes, Node.from_record, "node", self.log),
                           readable(peers, PeerSpec.from_record, "BGP peer", self.log),
                           [(f"etcd endpoint {e.host}", e.host)
                            for e in self.store.settings.endpoints])
            key = keys.pool(pool.name)
            ok, _ = self.store.txn(
                [prefix_unchanged_since(keys.POOLS, listing.revision),
                 prefix_unchanged_since(keys.NODES, nodes.revision),
                 prefix_unchanged_since(keys.BGP_PEERS, peers.revision), absent(key)],
                [put(key, pool.to_record())])
            if ok:
                self.log.info("pool added", pool=pool.name, cidr=pool.cidr)
                return
        raise Conflict(f"could not add pool {pool.name}: too many concurrent changes")

    def update_pool(self, name: str, **changes: bool) -> Pool:
        """Flip a pool's flags (disabled, nat_outgoing, strict_affinity)."""
        for _ in range(self.max_attempts):
            entry = self.store.get(keys.pool(name))
            if entry is None:
                raise PoolError(f"no pool named {name!r}")
            record = {**_pool(entry).to_record(), **changes}
            updated = Pool.from_record(record)
            ok, _ = self.store.txn([unchanged(entry.key, entry.mod_revision)],
                                   [put(entry.key, updated.to_record())])
            if ok:
                return updated
        raise Conflict(f"could not update pool {name}: too many concurrent changes")

    def remove_pool(self, name: str, force: bool = False) -> PoolRemoval:
        """Remove a pool and its blocks; refused while addresses are in use unless forced.

        The pool is first marked disabled (one transaction), which makes every in-flight
        allocation in it fail its pool compare; then its blocks go, each only if empty
        (or, when forced, with their allocations), then the pool record itself.
        """
        entry = self.store.get(keys.pool(name))
        if entry is None:
            raise PoolError(f"no pool named {name!r}")
        try:
            pool: Pool | None = _pool(entry)
        except CorruptValue as exc:  # nothing allocates from it: removable all the same
            self.log.warning("removing an unreadable pool record", key=exc.key,
                             reason=exc.reason)
            pool = None
        blocks = [b for b in self._blocks() if b.pool == name]
        used = self._used_addresses(blocks)
        if used and not force:
            raise PoolError(f"pool {name!r} has {len(used)} address(es) in use; release them "
                            "first or use --force")
        if pool is not None:
            ok, _ = self.store.txn([unchanged(entry.key, entry.mod_revision)],
                                   [put(entry.key, {**pool.to_record(), "disabled": True})])
            if not ok:
                raise Conflict(f"pool {name!r} changed while removing it; try again")
        released = 0
        if force:
            for address, owner in self._used_addresses(blocks).items():
                if self.release_address(address, force=True) is not None or owner is None:
                    released += 1
        for block in blocks:
            self._free_block(block, require_empty=not force)
        self.store.delete(keys.pool(name))
        self.log.info("pool removed", pool=name, blocks=len(blocks), released=released)
        return PoolRemoval(name, len(blocks), released)

    # -- allocation --------------------------------------------------------------------
    def allocate(self, handle: str, node: str, *, families: Sequence[int] = (4,),
                 pools: Sequence[str] | None = None,
                 attrs: dict[str, str] | None = None) -> Handle:
        """One address per requested family for `handle`, on `node`.

        Idempotent: a handle that already holds an address of a family gets that same
        address back, because runtimes retry ADD.

        An attempt decides on a view: the handle, the pools, and the block this node
        allocated from last time with its used ordinals (keys only). Every commit
        reads that view again in the same transaction (success or failure branch),
        and the next allocation on this node starts from it, assuming its own handle
        is new. So the common case is one round trip. The view is only a hint: the
        commit compares the block, the pool, the address key and the handle, so a
        stale view costs a retry (with a fresh view from the failure branch), never
        a duplicate.
        """
        return self.allocate_with(handle, node, families=families, pools=pools,
                                  attrs=attrs).record

    def allocate_with(self, handle: str, node: str, *, families: Sequence[int] = (4,),
                      pools: Sequence[str] | None = None,
                      attrs: dict[str, str] | None = None,
                      also_put: AlsoPut | None = None,
                      also_absent: Sequence[str] = (),
                      subnet: bool = False) -> Allocated:
        """`allocate`, writing `also_put(record)` in each of its commits, which also
        compare every key of `also_absent` absent: when one exists, KeyPresent is
        raised and nothing is written. `subnet`: the address goes on an interface with
        its block's prefix length, so never the block's network or broadcast address
        (see `subnet_edges`); they stay free for /32 containers."""
        check_handle(handle)
        return self._allocate(handle, node, families, pools, attrs, also_put,
                              tuple(also_absent), subnet)

    def _node_lock(self, node: str) -> threading.Lock:
        with self._guard:
            return self._node_locks.setdefault(node, threading.Lock())

    def _count(self, what: str) -> None:
        with self._guard:
            self.stats[what] += 1

    def _allocate(self, handle: str, node: str, families: Sequence[int],
                  pools: Sequence[str] | None, attrs: dict[str, str] | None,
                  also_put: AlsoPut | None, also_absent: tuple[str, ...],
                  subnet: bool) -> Allocated:
        # `since`: when the view in `rows` began to be read (see `_commit`).
        since = time.monotonic()
        hinted, rows, verified = self._start_view(handle, node, families)
        created = False
        for attempt in range(self.max_attempts):
            handle_rows, pool_rows = rows[:2]
            current = _only_entry(handle_rows)
            existing = _handle(current) if current else None
            if existing is not None and existing.node != node:
                # One container cannot be on two hosts: the same container ID on
                # another node is another container, and must not share the address.
                raise HandleElsewhere(f"handle {handle} is held by node {existing.node}; "
                                      f"a container ID is unique across the fabric")
            have = existing.families() if existing else set()
            missing = sorted(set(families) - have)
            if not missing:
                assert existing is not None
                return Allocated(existing, False, created)
            family = missing[0]
            try:
                candidates = _eligible_pools(pool_rows, family, pools)
                if not candidates:
                    wanted = f" among {', '.join(pools)}" if pools else ""
                    raise IpamError(f"no enabled IPv{family} pool{wanted} to allocate from")
                started = time.monotonic()
                outcome = self._allocate_once(handle, node, family, candidates,
                                              _usages(hinted, rows[2:]), current, existing,
                                              attrs or {}, also_put, also_absent,
                                              not verified, since, subnet)
            except IpamError:
                if verified:
                    raise
                # The cached view assumed a new handle and known pools. Before refusing,
                # read them for real: a retried ADD must get its address back even when
                # the pool is full.
                hinted, since = self._hinted(node, families), time.monotonic()
                rows, verified = self.store.read_many(_view_reads(handle, hinted)), True
                continue
            if isinstance(outcome, Allocated):
                created = created or outcome.created
                if set(families) <= outcome.record.families():
                    return Allocated(outcome.record, True, created, outcome.revision)
                hinted, since = self._hinted(node, families), time.monotonic()
                rows = self.store.read_many(_view_reads(handle, hinted))
            elif outcome.rows is not None:
                hinted, rows, since = outcome.hinted, outcome.rows, started
            else:
                self._backoff(attempt)
                hinted, since = self._hinted(node, families), time.monotonic()
                rows = self.store.read_many(_view_reads(handle, hinted))
            verified = True  # every view from here on was read, handle included
        raise Conflict(f"could not allocate for {handle}: lost {self.max_attempts} races")

    def _start_view(self, handle: str, node: str, families: Sequence[int]
                    ) -> tuple[list[str], list[list[Entry | CorruptValue]], bool]:
        """The first view of an allocation, and whether it was read (not cached)."""
        if len(families) == 1 and (node, families[0]) in self._views:
            cidr, rows, _ = self._views[node, families[0]]
            return [cidr], [[], *rows], False  # [] = handle assumed new; the commit checks
        hinted = self._hinted(node, families)
        return hinted, self.store.read_many(_view_reads(handle, hinted)), True

    def _hinted(self, node: str, families: Sequence[int]) -> list[str]:
        return [self._hints[node, f] for f in families if (node, f) in self._hints]

    def _allocate_once(self, handle: str, node: str, family: int,
                       candidates: list[tuple[Pool, Entry]], hinted: list[BlockUsage],
                       current: Entry | None, existing: Handle | None,
                       attrs: dict[str, str], also_put: AlsoPut | None,
                       also_absent: tuple[str, ...], cached: bool,
                       since: float, subnet: bool) -> Allocated | _Retry:
        by_name = {p.name: (p, e) for p, e in candidates}
        choice = next((u for u in self._with_pending(hinted, subnet)
                       if u.block.affinity == node
                       and u.block.pool in by_name and u.free > 0), None)
        borrowed = False
        cached = cached and choice is not None  # a scan reads afresh
        if choice is None:
            hint = self._hints.get((node, family))
            with self._node_lock(node):
                if self._hints.get((node, family)) != hint:
                    return _Retry()  # another allocation just found or claimed a block
                found = self._scan(node, family, candidates, by_name, subnet)
            if isinstance(found, _Retry):
                return found
            choice, borrowed = found
        _, pool_entry = by_name[choice.block.pool]
        return self._commit(handle, node, pool_entry, choice, current, existing, attrs,
                            borrowed, also_put, also_absent, cached, since, subnet)

    def _scan(self, node: str, family: int, candidates: list[tuple[Pool, Entry]],
              by_name: dict[str, tuple[Pool, Entry]],
              subnet: bool) -> tuple[BlockUsage, bool] | _Retry:
        """(block, borrowed) to allocate from when the hinted block cannot serve, or
        _Retry after claiming a new block for the node. Run under the node's lock."""
        self._count("scans")
        affinity_rows = self.store.list(keys.affinity_prefix(node)).entries
        mine = [c for c, pool_name in map(_affinity_cidr, affinity_rows)
                if pool_name in by_name]
        choice = pick_block(self._with_pending(
            [u for u in self._usage(mine) if u.block.affinity == node], subnet))
        if choice is not None:
            self._hints[node, family] = choice.block.cidr
            return choice, False
        for pool, pool_entry in candidates:
            claimed = self._claim(pool, pool_entry, node)
            if claimed is not None:  # a new block (or a race): read again and use it
                self._hints[node, family] = claimed
                return _Retry()
        for pool, _ in candidates:
            if pool.strict_affinity:
                continue
            others = [b.cidr for b in self._blocks() if b.pool == pool.name
                      and b.affinity != node]
            choice = pick_block(self._with_pending(self._usage(others), subnet))
            if choice is not None:
                return choice, True
        names = ", ".join(p.name for p, _ in candidates)
        raise Exhausted(f"no free address left for node {node} in pool(s) {names}")

    def _with_pending(self, usages: Iterable[BlockUsage], subnet: bool) -> list[BlockUsage]:
        """The usages with the ordinals of this process's commits in flight as used,
        and for a `subnet` allocation the block's edges too."""
        with self._guard:
            return [BlockUsage(u.block, u.mod_revision,
                               u.used | self._pending.get(u.block.cidr, frozenset())
                               | (subnet_edges(u.block.cidr) if subnet else frozenset()))
                    for u in usages]

    def _commit(self, handle: str, node: str, pool_entry: Entry, usage: BlockUsage,
                current: Entry | None, existing: Handle | None, attrs: dict[str, str],
                borrowed: bool, also_put: AlsoPut | None, also_absent: tuple[str, ...],
                cached: bool, since: float, subnet: bool) -> Allocated | _Retry:
        cidr = usage.block.cidr
        family = 6 if ":" in cidr else 4
        with self._guard:
            # A commit of ours that finished after this allocation's view was read is
            # pending no more, but the view it kept (before it stopped pending) holds
            # its address. A cached view is replaced by the newest one; a view read
            # from etcd takes the ordinals of one kept since it began to be read.
            used = usage.used
            kept = self._views.get((node, family))
            if kept is not None and kept[0] == cidr:  # rows: pools, block, ip keys
                if cached:
                    usage = next(iter(_usages([cidr], kept[1][1:])), usage)
                    used = usage.used
                elif kept[2] >= since:
                    used = used | {int(keys.last_segment(r.key)) for r in kept[1][-1]}
            pending = self._pending.setdefault(cidr, set())
            edges = subnet_edges(cidr) if subnet else frozenset()
            ordinal = choose_ordinal(usage.size, used | pending | edges, self.rng)
            if ordinal is None:  # the last free ones are being taken right now
                if not pending:
                    del self._pending[cidr]
                return _Retry()
            pending.add(ordinal)
        try:
            return self._commit_ordinal(handle, node, pool_entry, usage, ordinal, current,
                                        existing, attrs, borrowed, also_put, also_absent)
        finally:
            with self._guard:
                pending.discard(ordinal)
                if not pending and self._pending.get(cidr) is pending:
                    del self._pending[cidr]

    def _commit_ordinal(self, handle: str, node: str, pool_entry: Entry, usage: BlockUsage,
                        ordinal: int, current: Entry | None, existing: Handle | None,
                        attrs: dict[str, str], borrowed: bool, also_put: AlsoPut | None,
                        also_absent: tuple[str, ...]) -> Allocated | _Retry:
        cidr = usage.block.cidr
        address = address_at(cidr, ordinal)
        allocation = Allocation(address, cidr, usage.block.pool, borrowed)
        before = existing.allocations if existing else ()
        merged_attrs = {**(existing.attrs if existing else {}), **attrs}
        record = Handle(handle, node, (*before, allocation), merged_attrs)
        compare = [unchanged(keys.block(cidr), usage.mod_revision),
                   unchanged(pool_entry.key, pool_entry.mod_revision),
                   absent(keys.ip(cidr, ordinal))]
        compare.append(unchanged(current.key, current.mod_revision) if current
                       else absent(keys.handle(handle)))
        compare += [absent(key) for key in also_absent]
        success = [put(keys.ip(cidr, ordinal), {"handle": handle, "node": node,
                                                "address": address}),
                   put(keys.handle(handle), record.to_record())]
        if borrowed:
            success.append(put(keys.borrowed(node, address),
                               {"handle": handle, "block": cidr, "address": address}))
            self.log.info("borrowing address", handle=handle, node=node, address=address,
                          block=cidr)
        if also_put is not None:
            success += [put(key, value) for key, value in also_put(record)]
        after = _view_reads(None, [cidr])
        ok, fresh = self.store.txn(compare, [*success, *after],
                                   [*_view_reads(handle, [cidr]),
                                    *(get_op(key) for key in also_absent)])
        self._count("commits" if ok else "lost_races")
        if not ok:
            self._views.pop((node, allocation.family), None)
            view = fresh[:len(fresh) - len(also_absent)]
            for key, rows in zip(also_absent, fresh[len(view):], strict=True):
                if rows:
                    raise KeyPresent(key)
            return _Retry([cidr], view)
        view = fresh[len(success):]
        if not borrowed:
            self._keep_view(node, allocation.family, cidr, view)
        # The view was read in the commit's own transaction and holds the new address
        # key: its newest revision is the commit's.
        return Allocated(record, True, current is None, _newest(view))

    def _keep_view(self, node: str, family: int, cidr: str,
                   rows: list[list[Entry | CorruptValue]]) -> None:
        """Keep the view a commit read back, unless a later commit's is kept already.

        A view read in a commit's transaction holds that commit's own address key,
        and no key newer than it: the highest mod revision in it is the transaction's
        revision. Commits run side by side, so they may finish in any order."""
        revision = _newest(rows)
        with self._guard:
            kept = self._views.get((node, family))
            if kept is None or kept[0] != cidr or _newest(kept[1]) <= revision:
                self._views[node, family] = (cidr, rows, time.monotonic())

    def _claim(self, pool: Pool, pool_entry: Entry, node: str) -> str | None:
        """Claim the lowest free block of `pool` for `node`; None when the pool is full."""
        listing = self.store.list(keys.BLOCKS)
        claimed = [_block(e).cidr for e in listing.entries if e.value.get("pool") == pool.name]
        claimed += [keys.cidr_of_block_id(keys.last_segment(c.key)) for c in listing.corrupt]
        claimed = [c for c in claimed if _in_pool(pool, c)]
        cidr = first_free_block(pool, claimed)
        if cidr is None:
            return None
        ok, _ = self.store.txn(
            [absent(keys.block(cidr)), unchanged(pool_entry.key, pool_entry.mod_revision)],
            [put(keys.block(cidr), Block(cidr, pool.name, node).to_record()),
             put(keys.affinity(node, cidr), {"cidr": cidr, "pool": pool.name})])
        self._count("claims" if ok else "lost_claims")
        if ok:
            self.log.info("claimed block", node=node, block=cidr, pool=pool.name)
        return cidr

    def _usage(self, cidrs: Iterable[str]) -> list[BlockUsage]:
        """Each block's record revision and used ordinals (keys only), in few round trips."""
        cidrs = list(cidrs)
        reads: list[Read] = []
        for cidr in cidrs:
            reads += [get_op(keys.block(cidr)), keys_op(keys.ips_prefix(cidr))]
        return _usages(cidrs, self._read_chunked(reads))

    def _read_chunked(self, ops: list[Read]) -> list[list[Entry | CorruptValue]]:
        rows: list[list[Entry | CorruptValue]] = []
        for start in range(0, len(ops), MAX_TXN_OPS):
            rows += self.store.read_many(ops[start:start + MAX_TXN_OPS])
        return rows

    def _backoff(self, attempt: int) -> None:
        time.sleep(self.rng.uniform(0, 0.0005 * min(attempt + 1, 20)))

    # -- reading handles ---------------------------------------------------------------
    def handle(self, handle: str) -> Handle | None:
        """The addresses a handle holds, or None."""
        entry = self.store.get(keys.handle(check_handle(handle)))
        return _handle(entry) if entry else None

    def handles(self, node: str | None = None) -> list[Handle]:
        """Every handle (of one node); unreadable records are logged and skipped."""
        listing = self.store.list(keys.HANDLES)
        found = []
        for entry in listing.entries:
            try:
                record = _handle(entry)
            except CorruptValue as exc:
                self.log.error("handle record unreadable", key=exc.key, reason=exc.reason)
                continue
            if node is None or record.node == node:
                found.append(record)
        return sorted(found, key=lambda h: h.handle)

    # -- release -----------------------------------------------------------------------
    def release(self, handle: str, *, only_if_unregistered: bool = False,
                also_delete: Sequence[str] = (), known: Entry | None = None,
                node: str | None = None) -> list[str]:
        """Free every address of `handle`. Releasing a free handle is not an error.

        With `node`, only a handle of that node is released: one held by another node
        (another container with the same ID) is left alone, and only `also_delete` is
        done.

        With `only_if_unregistered`, the transaction also compares that the handle's
        workload registration does not exist, so GC never frees an address whose
        workload registered in the meantime. `also_delete` names keys (a workload
        registration) to delete in the same transaction. `known` is the handle's
        entry if the caller just read it: see `_release_known`.
        """
        check_handle(handle)
        if known is not None and not only_if_unregistered and (
                node is None or known.value.get("node") == node):
            freed = self._release_known(handle, known, also_delete)
            if freed is not None:
                return freed
        for attempt in range(self.max_attempts):
            entry = self.store.get(keys.handle(handle))
            if entry is None:
                if also_delete:
                    self.store.txn([], [delete(k) for k in also_delete])
                return []
            record = _handle(entry)
            if node is not None and record.node != node:
                if also_delete:
                    self.store.txn([], [delete(k) for k in also_delete])
                return []
            ip_keys = [_ip_key(a) for a in record.allocations]
            ip_rows = self._read_chunked([get_op(k) for k in ip_keys])
            compare = [unchanged(entry.key, entry.mod_revision)]
            success = [delete(entry.key), *(delete(k) for k in also_delete)]
            if only_if_unregistered:
                compare.append(absent(keys.workload(record.node, handle)))
            freed = []
            for allocation, key, rows in zip(record.allocations, ip_keys, ip_rows, strict=True):
                ip_entry = _only_entry(rows, raise_corrupt=False)
                if ip_entry is not None and ip_entry.value.get("handle") == handle:
                    compare.append(unchanged(key, ip_entry.mod_revision))
                    success.append(delete(key))
                    freed.append(allocation.address)
                if allocation.borrowed:
                    success.append(delete(keys.borrowed(record.node, allocation.address)))
            ok, _ = self.store.txn(compare, success)
            if ok:
                self.log.debug("released", handle=handle, addresses=freed)
                return freed
            if only_if_unregistered and self.store.get(keys.workload(record.node, handle)):
                return []
            self._backoff(attempt)
        raise Conflict(f"could not release {handle}: lost {self.max_attempts} races")

    def _release_known(self, handle: str, entry: Entry, also_delete: Sequence[str]
                       ) -> list[str] | None:
        """Release in one round trip, from a handle entry the caller read; None when
        the guess below does not hold (then `release` reads and decides as always).

        An allocation commit writes the address key and the handle record in one
        transaction, so the key's mod revision is that transaction's: the handle's
        create revision for its first address, its mod revision for the last one
        added. Comparing the keys at those revisions proves they are still this
        handle's, without reading them; anything else (a record rewritten by a repair,
        three addresses) fails the guess and takes the usual path.
        """
        record = _handle(entry)
        allocations = record.allocations
        if len(allocations) == 1 and entry.create_revision == entry.mod_revision:
            revisions = [entry.mod_revision]
        elif len(allocations) == 2:
            revisions = [entry.create_revision, entry.mod_revision]
        else:
            return None
        compare = [unchanged(entry.key, entry.mod_revision)]
        success = [delete(entry.key), *(delete(k) for k in also_delete)]
        for allocation, revision in zip(allocations, revisions, strict=True):
            compare.append(unchanged(_ip_key(allocation), revision))
            success.append(delete(_ip_key(allocation)))
            if allocation.borrowed:
                success.append(delete(keys.borrowed(record.node, allocation.address)))
        ok, _ = self.store.txn(compare, success)
        if not ok:
            return None
        freed = [a.address for a in allocations]
        self.log.debug("released", handle=handle, addresses=freed)
        return freed

    def adopt(self, handle: str, node: str, addresses: Sequence[str],
              attrs: dict[str, str] | None = None) -> Handle:
        """Record addresses already in use on `node` under `handle`, in one transaction.

        For what etcd forgot but a host still routes to a live container interface (a
        restore from an older backup): recorded again, the allocator never hands them
        to a second container. A block that is gone is claimed back for `node`; an
        address held by another handle meanwhile raises InUse naming it (a duplicate
        exists already: only an operator can choose which container keeps it).
        """
        check_handle(handle)
        pools = self.pools()
        compare: list[Any] = [absent(keys.handle(handle))]
        success: list[Any] = []
        allocations: list[Allocation] = []
        blocks: dict[str, Block | None] = {}
        for address in addresses:
            pool = pool_of(address, pools)
            if pool is None:
                continue
            cidr = block_containing(pool, address)
            if cidr not in blocks:
                entry = self.store.get(keys.block(cidr))
                blocks[cidr] = _block(entry) if entry else None
                if entry is None:
                    compare.append(absent(keys.block(cidr)))
                    success += [put(keys.block(cidr), Block(cidr, pool.name, node).to_record()),
                                put(keys.affinity(node, cidr), {"cidr": cidr,
                                                                "pool": pool.name})]
                else:
                    compare.append(unchanged(entry.key, entry.mod_revision))
            block = blocks[cidr]
            borrowed = block is not None and block.affinity != node
            ip_key = keys.ip(cidr, ordinal_of(cidr, address))
            holder = self.store.get(ip_key)
            if holder is not None:
                raise InUse(f"{address} is held by {holder.value.get('handle')}")
            compare.append(absent(ip_key))
            success.append(put(ip_key, {"handle": handle, "node": node, "address": address}))
            if borrowed:
                success.append(put(keys.borrowed(node, address),
                                   {"handle": handle, "block": cidr, "address": address}))
            allocations.append(Allocation(address, cidr, pool.name, borrowed))
        record = Handle(handle, node, tuple(allocations), dict(attrs or {}))
        ok, _ = self.store.txn(compare, [*success, put(keys.handle(handle),
                                                       record.to_record())])
        if not ok:
            raise Conflict(f"adopting {', '.join(addresses)} for {handle}: etcd changed "
                           "meanwhile; try again")
        self.log.warning("adopted addresses in use", handle=handle, node=node,
                         addresses=list(addresses))
        return record

    def restore_block(self, cidr: str, pool: str, node: str) -> bool:
        """Write a block record that is gone while `node` still has addresses in it
        (deleted by hand): without it the node stops announcing the block. False when
        a record exists (nothing to do)."""
        ok, _ = self.store.txn([absent(keys.block(cidr))],
                               [put(keys.block(cidr), Block(cidr, pool, node).to_record()),
                                put(keys.affinity(node, cidr), {"cidr": cidr, "pool": pool})])
        if ok:
            self.log.warning("restored a block record that was gone", block=cidr, node=node)
        return ok

    def release_address(self, address: str, *, force: bool = False) -> str | None:
        """Free one address whoever holds it; returns the handle that held it, if any.

        Refused with InUse while the holding handle has a workload registration, unless
        `force`: the next ADD would get the address while that container still uses
        it. The transaction compares the registration still absent, so a workload
        registering meanwhile is caught as well.
        """
        pool = pool_of(address, self.pools())
        if pool is None:
            raise IpamError(f"{address} is not inside any IP pool")
        cidr = block_containing(pool, address)
        key = keys.ip(cidr, ordinal_of(cidr, address))
        for attempt in range(self.max_attempts):
            (rows,) = self.store.read_many([get_op(key)])
            if not rows:
                return None
            ip_row = rows[0]
            if isinstance(ip_row, CorruptValue):
                self.store.delete(key)  # unreadable: the operator asked for it freed
                self.log.warning("released unreadable ip record", key=key)
                return None
            owner = str(ip_row.value.get("handle", ""))
            node = str(ip_row.value.get("node", ""))
            compare = [unchanged(key, ip_row.mod_revision)]
            success = [delete(key)]
            handle_entry = self.store.get(keys.handle(owner)) if owner else None
            nodes = {node} - {""}
            if handle_entry is not None:
                record = _handle(handle_entry)
                nodes.add(record.node)
                compare.append(unchanged(handle_entry.key, handle_entry.mod_revision))
                rest = record.without(address)
                success.append(put(handle_entry.key, rest.to_record()) if rest.allocations
                               else delete(handle_entry.key))
            if owner and not force:
                registered = [keys.workload(n, owner) for n in sorted(nodes)]
                for reg_key, found in zip(registered, self.store.read_many(
                        [get_op(k) for k in registered]), strict=True):
                    if found:
                        raise InUse(_in_use(address, owner, reg_key, found[0]))
                compare += [absent(k) for k in registered]
            if node:
                success.append(delete(keys.borrowed(node, address)))
            ok, _ = self.store.txn(compare, success)
            if ok:
                self.log.info("released address", address=address, handle=owner, forced=force)
                return owner or None
            self._backoff(attempt)
        raise Conflict(f"could not release {address}: lost {self.max_attempts} races")

    def drop_from_handle(self, handle: str, address: str) -> None:
        """Remove an address from a handle record whose ip key is not its own (repair)."""
        for attempt in range(self.max_attempts):
            entry = self.store.get(keys.handle(handle))
            if entry is None:
                return
            rest = _handle(entry).without(address)
            op = put(entry.key, rest.to_record()) if rest.allocations else delete(entry.key)
            ok, _ = self.store.txn([unchanged(entry.key, entry.mod_revision)], [op])
            if ok:
                return
            self._backoff(attempt)
        raise Conflict(f"could not repair handle {handle}")

    # -- check and repair --------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Everything `check` needs, read in one transaction (one consistent revision)."""
        pools_r, blocks_r, ips_r, handles_r, workloads_r, nodes_r = self.store.read_many(
            [list_op(keys.POOLS), list_op(keys.BLOCKS), list_op(keys.IPS),
             list_op(keys.HANDLES), list_op(keys.WORKLOADS), list_op(keys.NODES)])
        corrupt: list[CorruptValue] = []

        def good(rows: list[Entry | CorruptValue]) -> list[Entry]:
            corrupt.extend(r for r in rows if isinstance(r, CorruptValue))
            return [r for r in rows if isinstance(r, Entry)]

        pools = [p for p in (_decoded(_pool, e, corrupt) for e in good(pools_r)) if p]
        blocks = [b for b in (_decoded(_block, e, corrupt) for e in good(blocks_r)) if b]
        ips = []
        for row in ips_r:  # an unreadable ip key still reserves its address
            block_segment, ordinal = row.key[len(keys.IPS):].split("/")
            cidr = keys.cidr_of_block_id(block_segment)
            value = row.value if isinstance(row, Entry) else {}
            if isinstance(row, CorruptValue):
                corrupt.append(row)
            ips.append(IpOwner(address_at(cidr, int(ordinal)), cidr,
                               str(value.get("handle", "")), str(value.get("node", ""))))
        handles = {}
        for entry in good(handles_r):
            record = _decoded(_handle, entry, corrupt)
            if record:
                handles[record.handle] = record
        # A registration counts even when unreadable (its handle is not a leak); its
        # addresses are then unknown, and the record is reported as corrupt.
        workloads: dict[tuple[str, str], tuple[str, ...]] = {}
        for row in workloads_r:
            node, _, handle = row.key[len(keys.WORKLOADS):].partition("/")
            registered = _decoded(_workload, row, corrupt) if isinstance(row, Entry) else None
            if isinstance(row, CorruptValue):
                corrupt.append(row)
            workloads[node, handle] = registered.ips if registered else ()
        node_entries = good(nodes_r)
        nodes = {keys.last_segment(e.key) for e in node_entries}
        node_records = readable(Listing(node_entries, [], 0), Node.from_record, "node",
                                self.log)
        return Snapshot(pools, blocks, ips, handles, workloads, nodes, corrupt,
                        node_records=node_records)

    def release_found(self, report: Report, kinds: Iterable[str] = (
            "leak", "orphan-ip", "dangling", "orphan-block")) -> dict[str, int]:
        """Free what `check` found, each with the compares that keep it safe.

        Leaks are released only while their workload is still unregistered, orphan
        addresses only while no registered workload uses them; blocks of dead nodes
        only when empty. What needs a person (check.NEEDS_A_PERSON: duplicates,
        workload findings, corrupt records) is never touched.
        """
        wanted = set(kinds)
        done = {kind: 0 for kind in wanted}
        for finding in report.findings:
            if finding.kind not in wanted:
                continue
            if finding.kind == "leak":
                freed = self.release(finding.subject, only_if_unregistered=True)
                done["leak"] += bool(freed) or not finding.addresses
            elif finding.kind == "orphan-ip":
                done["orphan-ip"] += self._release_orphan_ip(finding.subject)
            elif finding.kind == "dangling":
                for address in finding.addresses:
                    self.drop_from_handle(finding.subject, address)
                done["dangling"] += 1
            elif finding.kind == "orphan-block" and finding.node:
                done["orphan-block"] += len(self.release_empty_blocks(finding.node))
        return done

    def _release_orphan_ip(self, address: str) -> bool:
        """Delete an address key its handle does not list; whether it was deleted.

        Kept while the handle's workload registration lists the address: the handle
        record lost it, but the container uses it, and freeing the key would hand it
        to the next ADD. The delete compares that registration unchanged.
        """
        pool = pool_of(address, self.pools())
        if pool is None:
            return False
        cidr = block_containing(pool, address)
        key = keys.ip(cidr, ordinal_of(cidr, address))
        (rows,) = self.store.read_many([get_op(key)])
        if not rows:
            return False
        row = rows[0]
        handle = str(row.value.get("handle") or "") if isinstance(row, Entry) else ""
        node = str(row.value.get("node") or "") if isinstance(row, Entry) else ""
        compare = [unchanged(key, row.mod_revision)] if isinstance(row, Entry) else []
        if handle:
            entry = self.store.get(keys.handle(handle))
            if entry and address in _handle(entry).addresses():
                return False  # no longer an orphan: its handle lists it now
        if handle and node:
            registration_key = keys.workload(node, handle)
            (registered,) = self.store.read_many([get_op(registration_key)])
            if registered:
                current = registered[0]
                if isinstance(current, CorruptValue) or _lists(current, address):
                    self.log.warning("orphan address kept: its workload uses it",
                                     address=address, handle=handle, node=node)
                    return False
                compare.append(unchanged(registration_key, current.mod_revision))
            else:
                compare.append(absent(registration_key))
        ok, _ = self.store.txn(compare, [delete(key)])
        if ok:
            self.log.info("released orphan address", address=address)
        return ok

    # -- blocks ------------------------------------------------------------------------
    def _blocks(self) -> list[Block]:
        listing = self.store.list(keys.BLOCKS)
        for bad in listing.corrupt:
            self.log.error("block record unreadable", key=bad.key, reason=bad.reason)
        return [_block(e) for e in listing.entries]

    def blocks(self) -> list[Block]:
        return sorted(self._blocks(), key=lambda b: (b.pool, ipaddress.ip_network(b.cidr)))

    def blocks_of(self, node: str) -> list[Block]:
        return [b for b in self.blocks() if b.affinity == node]

    def release_empty_blocks(self, node: str) -> list[str]:
        """Give back every empty block affine to `node` (a host that left the fabric)."""
        freed = []
        for block in self.blocks_of(node):
            if self._free_block(block, require_empty=True):
                freed.append(block.cidr)
        for row in self.store.list(keys.affinity_prefix(node)).entries:
            cidr = str(row.value.get("cidr", ""))
            if cidr and self.store.get(keys.block(cidr)) is None:
                self.store.delete(row.key)  # stale index entry
        return freed

    def _free_block(self, block: Block, require_empty: bool) -> bool:
        entry = self.store.get(keys.block(block.cidr))
        if entry is None:
            return False
        compare = [unchanged(entry.key, entry.mod_revision)]
        success = [delete(entry.key)]
        if require_empty:
            compare.append(prefix_empty(keys.ips_prefix(block.cidr)))
        else:
            success.append(delete_under(keys.ips_prefix(block.cidr)))
        affinity = _block(entry).affinity
        if affinity:
            success.append(delete(keys.affinity(affinity, block.cidr)))
        ok, _ = self.store.txn(compare, success)
        if ok:
            self.log.info("freed block", block=block.cidr, node=affinity)
        return ok

    def _used_addresses(self, blocks: Iterable[Block]) -> dict[str, str | None]:
        blocks = list(blocks)
        rows = self._read_chunked([list_op(keys.ips_prefix(b.cidr)) for b in blocks])
        used: dict[str, str | None] = {}
        for block, block_rows in zip(blocks, rows, strict=True):
            for row in block_rows:
                key = row.key
                address = address_at(block.cidr, int(keys.last_segment(key)))
                used[address] = row.value.get("handle") if isinstance(row, Entry) else None
        return used


def _in_use(address: str, handle: str, key: str, row: Entry | CorruptValue) -> str:
    """The refusal naming the workload that uses `address`."""
    node = key[len(keys.WORKLOADS):].partition("/")[0]
    container = "?"
    if isinstance(row, Entry):
        container = str(row.value.get("container_id") or "?")
    return (f"{address} is in use by container {container} (handle {handle}) on node "
            f"{node}: the next ADD could get it while that container still uses it; "
            "use --force only if the container is gone")


def _pool(entry: Entry) -> Pool:
    return parsed(entry, Pool.from_record, "pool")


def _block(entry: Entry) -> Block:
    return parsed(entry, Block.from_record, "block")


def _handle(entry: Entry) -> Handle:
    return parsed(entry, Handle.from_record, "handle")


def _workload(entry: Entry) -> Workload:
    return parsed(entry, Workload.from_record, "workload")


def _lists(registration: Entry, address: str) -> bool:
    """Whether a workload registration lists `address`; an unreadable one might."""
    try:
        return address in _workload(registration).ips
    except CorruptValue:
        return True


def _decoded(parse: Any, entry: Entry, corrupt: list[CorruptValue]) -> Any:
    try:
        return parse(entry)
    except CorruptValue as exc:
        corrupt.append(exc)
        return None


def _in_pool(pool: Pool, cidr: str) -> bool:
    try:
        return pool_of(cidr.split("/")[0], [pool]) is not None
    except ValueError:
        return False


def _affinity_cidr(row: Entry | CorruptValue) -> tuple[str, str]:
    if isinstance(row, CorruptValue):
        return keys.cidr_of_block_id(keys.last_segment(row.key)), ""
    return str(row.value.get("cidr", "")), str(row.value.get("pool", ""))


def _view_reads(handle: str | None, hinted: list[str]) -> list[Read]:
    """What one allocation attempt decides on: handle, pools, hinted blocks' usage."""
    reads = [get_op(keys.handle(handle))] if handle is not None else []
    reads.append(list_op(keys.POOLS))
    for cidr in hinted:
        reads += [get_op(keys.block(cidr)), keys_op(keys.ips_prefix(cidr))]
    return reads


def _usages(cidrs: list[str], rows: list[list[Entry | CorruptValue]]) -> list[BlockUsage]:
    """Pair up (block record, ip keys) reads; blocks freed meanwhile are left out."""
    usages = []
    for index in range(len(cidrs)):
        block_rows, ip_rows = rows[2 * index], rows[2 * index + 1]
        entry = _only_entry(block_rows, raise_corrupt=False)
        if entry is None:
            continue  # freed meanwhile, or unreadable: not usable
        used = frozenset(int(keys.last_segment(r.key)) for r in ip_rows)
        usages.append(BlockUsage(_block(entry), entry.mod_revision, used))
    return usages


def _newest(rows: list[list[Entry | CorruptValue]]) -> int:
    return max((r.mod_revision for group in rows for r in group if isinstance(r, Entry)),
               default=0)


def _ip_key(allocation: Allocation) -> str:
    return keys.ip(allocation.block, ordinal_of(allocation.block, allocation.address))


def _only_entry(rows: list[Entry | CorruptValue], raise_corrupt: bool = True) -> Entry | None:
    if not rows:
        return None
    row = rows[0]
    if isinstance(row, CorruptValue):
        if raise_corrupt:
            raise row
        return None
    return row


def _eligible_pools(rows: list[Entry | CorruptValue], family: int,
                    names: Sequence[str] | None) -> list[tuple[Pool, Entry]]:
    eligible = []
    for row in rows:
        if isinstance(row, CorruptValue):
            continue
        try:
            pool = _pool(row)
        except CorruptValue:
            continue
        if pool.disabled or pool.family != family:
            continue
        if names is not None and pool.name not in names:
            continue
        eligible.append((pool, row))
    return sorted(eligible, key=lambda pe: pe[0].name)
