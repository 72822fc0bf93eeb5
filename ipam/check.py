"""Consistency check of IPAM state: pure, over one snapshot read in one round trip.

What it finds:
* leak: a handle whose workload registration does not exist;
* orphan-ip: an address key whose handle record is missing or does not list it;
* dangling: a handle that lists an address whose key does not exist (the address
  could be handed to someone else);
* duplicate: an address listed by two handles, or held by another handle than the
  one listing it; must never happen, never auto-repaired;
* orphan-block: a block affine to a node that is not registered;
* blockless: addresses reserved inside a block that has no record (deleted by hand):
  its node stops announcing it and another node may claim it (the agent of the
  node holding them writes the record again; this says so meanwhile);
* workload-unreserved: a registered workload uses an address that no handle holds
  (no address key): the allocator can hand it to the next ADD while the container
  still uses it;
* workload-conflict: a registered workload uses an address that another handle
  holds: two containers may be using one address;
* underlay: a pool that covers a node's underlay address or network (written before
  the node registered, or by hand): its blocks are neither announced nor blackholed
  by the node that owns them (the agent refuses them), so containers given addresses
  there reach nothing;
* corrupt: a record that cannot be read.

Duplicates, workload, underlay findings and corrupt records need a person
(NEEDS_A_PERSON):
`ipam release --leaked` never touches them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from fabric.model.blocks import Block
from fabric.model.handles import Handle
from fabric.model.nodes import Node
from fabric.model.pools import Pool, underlay_conflicts
from fabric.store.errors import CorruptValue
from ipam.blocks import capacity

KINDS = ("leak", "orphan-ip", "dangling", "duplicate", "orphan-block", "blockless",
         "workload-unreserved", "workload-conflict", "underlay", "corrupt")
NEEDS_A_PERSON = ("duplicate", "workload-unreserved", "workload-conflict", "underlay",
                  "corrupt")


@dataclass(frozen=True)
class IpOwner:
    """One address key: which handle and node hold the address."""

    address: str
    block: str
    handle: str
    node: str


@dataclass
class Snapshot:
    pools: list[Pool]
    blocks: list[Block]
    ips: list[IpOwner]
    handles: dict[str, Handle]
    workloads: dict[tuple[str, str], tuple[str, ...]]  # (node, handle) -> its ips
    nodes: set[str]
    corrupt: list[CorruptValue] = field(default_factory=list)
    revision: int = 0
    node_records: list[Node] = field(default_factory=list)  # the readable ones


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str
    detail: str
    node: str | None = None
    addresses: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail,
                "node": self.node, "addresses": list(self.addresses)}


@dataclass
class Report:
    findings: list[Finding]
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.findings

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "counts": self.counts,
                "findings": [f.to_dict() for f in self.findings]}


def check(snap: Snapshot) -> Report:
    findings: list[Finding] = []
    holder_of = {ip.address: ip for ip in snap.ips}

    for handle in sorted(snap.handles.values(), key=lambda h: h.handle):
        if (handle.node, handle.handle) not in snap.workloads:
            findings.append(Finding(
                "leak", handle.handle, f"no workload registered for it on {handle.node}",
                handle.node, tuple(a.address for a in handle.allocations)))

    listed_by: dict[str, list[str]] = defaultdict(list)
    for handle in snap.handles.values():
        for allocation in handle.allocations:
            listed_by[allocation.address].append(handle.handle)
            owner = holder_of.get(allocation.address)
            if owner is None:
                findings.append(Finding(
                    "dangling", handle.handle,
                    f"lists {allocation.address} but that address is not reserved",
                    handle.node, (allocation.address,)))
            elif owner.handle != handle.handle:
                findings.append(Finding(
                    "duplicate", allocation.address,
                    f"listed by {handle.handle} but held by {owner.handle}",
                    handle.node, (allocation.address,)))
    for address, holders in sorted(listed_by.items()):
        if len(holders) > 1:
            findings.append(Finding("duplicate", address,
                                    f"listed by {len(holders)} handles: {', '.join(holders)}",
                                    None, (address,)))

    for (node, handle_id), addresses in sorted(snap.workloads.items()):
        for address in addresses:
            owner = holder_of.get(address)
            if owner is None:
                findings.append(Finding(
                    "workload-unreserved", handle_id,
                    f"registered on {node} with {address}, which no handle holds: the next "
                    "ADD can get it while this container uses it", node, (address,)))
            elif owner.handle != handle_id:
                findings.append(Finding(
                    "workload-conflict", handle_id,
                    f"registered on {node} with {address}, which handle {owner.handle} "
                    "holds: two containers may use one address", node, (address,)))

    for ip in sorted(snap.ips, key=lambda i: i.address):
        handle = snap.handles.get(ip.handle)
        if handle is None or ip.address not in {a.address for a in handle.allocations}:
            detail = f"reserved for {ip.handle or '?'}, which does not list it"
            if ip.address in snap.workloads.get((ip.node, ip.handle), ()):
                detail += "; its registered workload uses it, so release --leaked keeps it"
            findings.append(Finding("orphan-ip", ip.address, detail, ip.node or None,
                                    (ip.address,)))

    used_per_block = Counter(ip.block for ip in snap.ips)
    for block in snap.blocks:
        if block.affinity is not None and block.affinity not in snap.nodes:
            findings.append(Finding(
                "orphan-block", block.cidr,
                f"affine to {block.affinity}, which is not registered "
                f"({used_per_block[block.cidr]} address(es) in use)", block.affinity))

    recorded = {b.cidr for b in snap.blocks}
    missing: dict[str, list[IpOwner]] = defaultdict(list)
    for ip in snap.ips:
        if ip.block not in recorded:
            missing[ip.block].append(ip)
    for cidr, held in sorted(missing.items()):
        nodes = sorted({ip.node for ip in held if ip.node})
        findings.append(Finding(
            "blockless", cidr, f"{len(held)} address(es) reserved (by {', '.join(nodes)}) "
            "in a block with no record", nodes[0] if nodes else None,
            tuple(sorted(ip.address for ip in held))))

    for pool in snap.pools:
        conflicts = underlay_conflicts(pool, snap.node_records, ())
        if conflicts:
            findings.append(Finding(
                "underlay", pool.name, f"pool {pool.cidr} overlaps {', '.join(conflicts)}: "
                "its blocks there are not routed; disable the pool and move its "
                "workloads"))

    for bad in snap.corrupt:
        findings.append(Finding("corrupt", bad.key, bad.reason))

    total = sum(capacity(b.cidr) for b in snap.blocks)
    counts = {
        "pools": len(snap.pools), "blocks": len(snap.blocks), "nodes": len(snap.nodes),
        "addresses_used": len(snap.ips), "addresses_free_in_blocks": total - len(snap.ips),
        "handles": len(snap.handles), "workloads": len(snap.workloads),
    }
    for kind in KINDS:
        counts[kind] = sum(1 for f in findings if f.kind == kind)
    return Report(findings, counts)


@dataclass(frozen=True)
class Usage:
    """One row of `ipam show`: a pool, optionally narrowed to one host."""

    pool: str
    cidr: str
    node: str | None
    blocks: int
    used: int
    free: int


def usage(snap: Snapshot, per_host: bool = True) -> list[Usage]:
    used_per_block = Counter(ip.block for ip in snap.ips)
    rows: list[Usage] = []
    for pool in snap.pools:
        blocks = [b for b in snap.blocks if b.pool == pool.name]
        block_size = 1 << (pool.network.max_prefixlen - pool.block_size)
        used = sum(used_per_block[b.cidr] for b in blocks)
        rows.append(Usage(pool.name, pool.cidr, None, len(blocks), used,
                          pool.network.num_addresses - used))
        if per_host:
            by_node: dict[str, list[Block]] = defaultdict(list)
            for block in blocks:
                by_node[block.affinity or "-"].append(block)
            for node, node_blocks in sorted(by_node.items()):
                node_used = sum(used_per_block[b.cidr] for b in node_blocks)
                rows.append(Usage(pool.name, pool.cidr, node, len(node_blocks), node_used,
                                  len(node_blocks) * block_size - node_used))
    return rows


def leaked_handles(report: Report, node: str | None = None) -> list[str]:
    return [f.subject for f in report.of("leak") if node is None or f.node == node]


def dead_nodes(report: Report) -> set[str]:
    return {f.node for f in report.of("orphan-block") if f.node}

