"""Policies, labels and workloads -> one host's rule model -> an nftables document. Pure.

The shape (see docs/policy.md for a listing): one table, `inet l3fabric`, that the
agent owns whole.

    chain forward         hook forward: replies of allowed connections pass
                          (conntrack); packets from a local workload (iifname l3f*)
                          go through `egress`, packets to one (oifname l3f*) through
                          `ingress`
    chain egress          jump egress_rules; then `ip saddr @iso_egress_4 jump deny`
    chain egress_rules    one jump per policy with egress rules: `jump pe_<hash>`
    chain pe_<hash>       that policy's rules, one per (rule, peer set, family):
                          `ip saddr @<selected> ip daddr @<peers> tcp dport 80
                          goto egress_allowed`
    chain egress_allowed  the ingress check if the packet goes to a local workload,
                          then accept
    chain ingress         jump ingress_rules; then `ip daddr @iso_ingress_4 jump deny`
    chain ingress_rules   one jump per policy with ingress rules: `jump pi_<hash>`
    chain pi_<hash>       the same with the roles swapped, each rule ending in accept
    chain deny            reject: TCP reset, else ICMP administratively prohibited
    chain prerouting      hook prerouting (priority raw), policy or not: a packet from a
                          workload's veth whose source is not that workload's address
                          is dropped (`fib saddr . iif oif missing`: each workload
                          address has a /32 or /128 route out of its own veth), so a
                          container with CAP_NET_RAW cannot borrow another's identity
                          past the rules below (Calico's RPF check)

Every policy rule's verdict ends the evaluation, so the order of policies does not
matter: a policy change flushes and fills that policy's chain, or adds or deletes the
chain and the one jump to it, in one transaction, instead of building the table again
(`structure_changes_text`).

Only the forward hook is used, so traffic between a workload and its own host (input
and output hooks) always passes, and each direction is enforced where the workload
lives: egress on the source's host, ingress on the destination's.

Every address set is named after what it selects (a hash of its selector), never after
the workloads in it: the ruleset grows with the policies, and a workload that comes,
goes or changes labels changes set elements only (`element_changes`), never a rule.
`sel_*` sets hold this host's workloads a policy selects; `peer_*` sets every matching
workload of the fabric, one set per selector peer (a namespaceSelector peer's set is
shared by every namespace's policies). ipBlocks are static interval sets (`cidr` less
`except`), and so are ports: one protocol's several ports a `ports_*` set, ports of
several protocols one `l4_*` set matched as `meta l4proto . th dport`. Rules are what a
big table costs nftables to load, hence these merges (see docs/performance.md).

`render()` gives the table as nftables JSON (what tests and `policy explain` read);
`render_text()` the same in nft's own language, which the adapter applies.

`evaluate()` runs a packet through a ruleset as `nft -j list table` printed it: the
independent check that what the kernel holds agrees with `fabric.model.policy.decide`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric.model.policy import (
    Endpoint,
    IpBlock,
    NetworkPolicy,
    Peer,
    Rule,
    Selector,
    namespace_labels,
)

TABLE = "l3fabric"
FAMILY = "inet"
RULE_CHAINS = {"egress": "egress_rules", "ingress": "ingress_rules"}
CHAINS = ("egress", "egress_rules", "egress_allowed", "ingress", "ingress_rules", "deny")
WORKLOAD_IFACES = "l3f*"  # fabric.kernel.links.HOST_PREFIX + wildcard
# The anti-spoofing base chain: (family, nft text of the matches before the fib check).
# IPv6 link-local sources (neighbour discovery, router solicitations) and the
# unspecified address (duplicate address detection) are exempt: the container sends
# them before and beside its own address, and they never leave the link. ARP is not
# seen by an inet table at all. Both families always, whatever the pools: a
# container without an IPv6 address has no /128 route, so any global IPv6 source it
# forges fails the lookup too.
SPOOF_COMMENT = "source is not the workload's own address"
PREROUTING_PRIORITY = -300  # raw: before conntrack and every other filter
DIRECTIONS = ("ingress", "egress")
COMMENT_MAX = 127


@dataclass(frozen=True)
class AddressSet:
    name: str
    family: int
    elements: frozenset[str] = frozenset()  # addresses; prefixes when `interval`
    interval: bool = False  # static (ipBlock): part of the structure


@dataclass(frozen=True)
class NftRule:
    direction: str  # ingress or egress
    family: int
    subject: str  # set of this host's workloads the policy selects
    peer: str | None  # set of peer addresses; None: any
    protocol: str | None  # tcp, udp, sctp; "l4": several (`ports` names an l4 set); None: any
    ports: tuple[tuple[int, int], ...] | str | None  # inline ranges, a port set, or any
    comment: str
    chain: str = ""  # the policy's chain for this direction (`policy_chain`)
    policy: str = ""  # NS/NAME


def policy_chain(key: str, direction: str) -> str:
    """The chain of one policy's rules of one direction: `pi_<hash>` or `pe_<hash>`."""
    return f"p{direction[0]}_{_hash(key)}"


@dataclass(frozen=True)
class HostRules:
    """What one host enforces; equal rule models give equal rulesets."""

    families: tuple[int, ...]
    sets: tuple[AddressSet, ...] = ()
    port_sets: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    # protocol . port sets, for rules whose ports span protocols: (proto, low, high)
    l4_sets: tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...] = ()
    rules: tuple[NftRule, ...] = ()
    policies: int = 0
    local: int = 0

    def structure(self) -> tuple[Any, ...]:
        """Everything but the elements of dynamic sets: equal structures mean an update
        is set elements only."""
        return (self.families, tuple((s.name, s.family, s.interval,
                                      s.elements if s.interval else None)
                                     for s in self.sets), self.port_sets, self.l4_sets,
                self.rules)

    def policy_chains(self) -> dict[str, tuple[str, str]]:
        """chain -> (direction, policy NS/NAME) of every policy chain, in rule order."""
        out: dict[str, tuple[str, str]] = {}
        for rule in self.rules:
            out.setdefault(rule.chain, (rule.direction, rule.policy))
        return out

    def by_chain(self) -> dict[str, list[NftRule]]:
        """Each policy chain's rules, in order."""
        out: dict[str, list[NftRule]] = {}
        for rule in self.rules:
            out.setdefault(rule.chain, []).append(rule)
        return out

    def chain_rules(self, chain: str) -> list[NftRule]:
        return self.by_chain().get(chain, [])

    def dynamic(self) -> dict[str, frozenset[str]]:
        return {s.name: s.elements for s in self.sets if not s.interval}

    def digest(self) -> str:
        text = json.dumps([repr(self.structure()), sorted(
            (k, sorted(v)) for k, v in self.dynamic().items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1 << 14)
def _hash(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


# Memos across compiles (the agent compiles again at every change): selectors are
# frozen records and label sets are frozensets, so the answers never go stale.
@functools.lru_cache(maxsize=1 << 16)
def _selects(selector: Selector, labels: frozenset[tuple[str, str]]) -> bool:
    return selector.matches(dict(labels))


@functools.lru_cache(maxsize=1 << 12)
def _block_elements(blocks: tuple[IpBlock, ...], family: int) -> tuple[str, ...]:
    """The addresses of several ipBlocks as disjoint intervals (what an nft interval set
    takes): `a/len` where an interval is a prefix, else `first-last`."""
    merged: list[list[int]] = []
    for first, last in sorted(r for b in blocks if b.family == family for r in b.ranges()):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return tuple(_interval_text(first, last, family) for first, last in merged)


def _address(value: int, family: int) -> str:
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


def _interval_text(first: int, last: int, family: int) -> str:
    size = last - first + 1
    bits = 32 if family == 4 else 128
    if size & (size - 1) == 0 and first % size == 0:
        return f"{_address(first, family)}/{bits - size.bit_length() + 1}"
    return f"{_address(first, family)}-{_address(last, family)}"


def interval_key(text: str) -> str:
    """An address, prefix or range of addresses as `first-last` (how summaries compare
    interval elements, whichever form nft lists them in)."""
    if "-" in text:
        first, _, last = text.partition("-")
        return f"{ipaddress.ip_address(first)}-{ipaddress.ip_address(last)}"
    network = ipaddress.ip_network(text, strict=False)
    return f"{network.network_address}-{network.broadcast_address}"


def _family(address: str) -> int:
    return 6 if ":" in address else 4


@dataclass
class _Builder:
    namespaces: Mapping[str, Mapping[str, str]]
    endpoints: Sequence[Endpoint]
    local: Sequence[Endpoint]
    families: tuple[int, ...]
    sets: dict[str, AddressSet] = field(default_factory=dict)
    port_sets: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    l4_sets: dict[str, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # namespace -> label set -> addresses: selectors are judged once per label set
        self.by_namespace = _grouped(self.endpoints)
        self.local_by_namespace = _grouped(self.local)
        self.ns_labels = {ns: frozenset(namespace_labels(ns, self.namespaces).items())
                          for ns in set(self.by_namespace) | set(self.namespaces)}

    def _add(self, name: str, family: int, addresses: Iterable[str],
             interval: bool = False) -> str:
        if name not in self.sets:
            self.sets[name] = AddressSet(name, family, frozenset(
                a for a in addresses if _family(a) == family), interval)
        return name

    def _split(self, prefix: str, addresses: list[str]) -> None:
        """Sets `<prefix>_4` and `<prefix>_6` from one list of addresses."""
        by_family: dict[int, list[str]] = {f: [] for f in self.families}
        for address in addresses:
            family = 6 if ":" in address else 4
            if family in by_family:
                by_family[family].append(address)
        for family, chosen in by_family.items():
            name = f"{prefix}_{family}"
            self.sets[name] = AddressSet(name, family, frozenset(chosen))

    def subject(self, namespace: str, selector: Selector, family: int) -> str:
        prefix = f"sel_{_hash(namespace, selector)}"
        if f"{prefix}_{family}" not in self.sets:
            self._split(prefix, [a for labels, addresses in
                                 self.local_by_namespace.get(namespace, {}).items()
                                 if _selects(selector, labels) for a in addresses])
        return f"{prefix}_{family}"

    def peer(self, namespace: str, peer: Peer, family: int) -> str:
        """The set of one selector peer: shared by every policy with the same peer (a
        namespaceSelector's set by every namespace's policies)."""
        scope = namespace if peer.namespaces is None else "*"
        prefix = f"peer_{_hash(scope, peer)}"
        if f"{prefix}_{family}" not in self.sets:
            if peer.namespaces is None:
                spaces = [namespace]
            else:
                selector = peer.namespaces
                spaces = [ns for ns, labels in self.ns_labels.items()
                          if _selects(selector, labels)]
            chosen: list[str] = []
            for ns in spaces:
                chosen += [a for labels, addresses in self.by_namespace.get(ns, {}).items()
                           if peer.pods is None or _selects(peer.pods, labels)
                           for a in addresses]
            self._split(prefix, chosen)
        return f"{prefix}_{family}"

    def blocks(self, peers: tuple[Peer, ...], family: int) -> str | None:
        elements = _block_elements(tuple(p.block for p in peers if p.block is not None),
                                   family)
        if not elements:
            return None
        return self._add(f"cidr_{_hash(elements)}_{family}", family, elements, interval=True)

    def ports(self, rule: Rule) -> list[tuple[str | None, Any]]:
        """(protocol, ports) pairs one rule allows; empty: it allows nothing."""
        if not rule.ports:
            return [(None, None)]
        out: list[tuple[str | None, Any]] = []
        for protocol in ("TCP", "UDP", "SCTP"):
            entries = [p for p in rule.ports if p.protocol == protocol]
            if not entries:
                continue
            if any(p.port is None for p in entries):
                out.append((protocol.lower(), None))
                continue
            ranges = _merge([(p.port, p.end or p.port) for p in entries
                             if isinstance(p.port, int)])
            if not ranges:
                continue  # only named ports: they match nothing
            if len(ranges) == 1:
                out.append((protocol.lower(), ranges))
            else:
                name = f"ports_{_hash(ranges)}"
                self.port_sets[name] = ranges
                out.append((protocol.lower(), name))
        if len(out) < 2:
            return out
        # Several protocols: one rule matching `meta l4proto . th dport` in one set,
        # not a rule per protocol (rules are what a big ruleset costs to load).
        elements: list[tuple[str, int, int]] = []
        for protocol, ports in out:
            assert protocol is not None
            if ports is None:
                elements.append((protocol, 0, 65535))
            else:
                ranges = self.port_sets[ports] if isinstance(ports, str) else ports
                elements += [(protocol, low, high) for low, high in ranges]
        name = f"l4_{_hash(tuple(elements))}"
        self.l4_sets[name] = tuple(elements)
        return [("l4", name)]


def _grouped(endpoints: Iterable[Endpoint]
             ) -> dict[str, dict[frozenset[tuple[str, str]], list[str]]]:
    out: dict[str, dict[frozenset[tuple[str, str]], list[str]]] = {}
    for endpoint in endpoints:
        key = frozenset(endpoint.labels.items())
        out.setdefault(endpoint.namespace, {}).setdefault(key, []).extend(endpoint.ips)
    return out


def _merge(ranges: list[tuple[Any, Any]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def compile_host(policies: Iterable[NetworkPolicy],
                 namespaces: Mapping[str, Mapping[str, str]],
                 endpoints: Sequence[Endpoint], local: Sequence[Endpoint],
                 families: tuple[int, ...] = (4, 6)) -> HostRules:
    """The rule model of one host: `endpoints` are every workload of the fabric,
    `local` this host's (also among `endpoints`)."""
    builder = _Builder(namespaces, endpoints, local, families)
    rules: list[NftRule] = []
    isolated: dict[tuple[str, int], set[str]] = {(d, f): set() for d in DIRECTIONS
                                                 for f in families}
    ordered = sorted(policies, key=lambda p: p.key)
    for policy in ordered:
        for direction in DIRECTIONS:
            if not policy.applies(direction):
                continue
            for family in families:
                subject = builder.subject(policy.namespace, policy.selector, family)
                isolated[(direction, family)] |= builder.sets[subject].elements
                for index, rule in enumerate(policy.rules(direction)):
                    comment = f"{policy.key} {direction}[{index}]"[:COMMENT_MAX]
                    rules += _rules(builder, policy, rule, direction, family, subject, comment,
                                    policy_chain(policy.key, direction))
    for (direction, family), addresses in sorted(isolated.items()):
        builder._add(f"iso_{direction}_{family}", family, addresses)
    sets = tuple(sorted(builder.sets.values(), key=lambda s: s.name))
    used = {r.ports for r in rules if isinstance(r.ports, str)}
    port_sets = tuple(sorted((k, v) for k, v in builder.port_sets.items() if k in used))
    return HostRules(families, sets, port_sets, tuple(sorted(builder.l4_sets.items())),
                     tuple(rules), len(ordered), len(local))


def _rules(builder: _Builder, policy: NetworkPolicy, rule: Rule, direction: str, family: int,
           subject: str, comment: str, chain: str) -> list[NftRule]:
    peers: list[str | None]
    if not rule.peers:
        peers = [None]
    else:
        peers = []
        for peer in rule.peers:
            if peer.block is None:
                name = builder.peer(policy.namespace, peer, family)
                if name not in peers:
                    peers.append(name)
        cidr = builder.blocks(rule.peers, family)
        if cidr:
            peers.append(cidr)
    return [NftRule(direction, family, subject, peer, protocol, ports, comment, chain,
                    policy.key[:COMMENT_MAX])
            for peer in peers for protocol, ports in builder.ports(rule)]


# -- rendering ---------------------------------------------------------------------------
def _addr_field(family: int, role: str) -> dict[str, Any]:
    return {"payload": {"protocol": "ip" if family == 4 else "ip6", "field": role}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _element(address: str, interval: bool) -> Any:
    if interval and "-" in address:
        first, _, last = address.partition("-")
        return {"range": [first, last]}
    if interval:
        network = ipaddress.ip_network(address)
        return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}
    return address


def _port_value(ranges: tuple[tuple[int, int], ...]) -> Any:
    low, high = ranges[0]
    return low if low == high else {"range": [low, high]}


def _rule_exprs(rule: NftRule) -> list[dict[str, Any]]:
    local, remote = ("daddr", "saddr") if rule.direction == "ingress" else ("saddr", "daddr")
    exprs = [_match(_addr_field(rule.family, local), f"@{rule.subject}")]
    if rule.peer is not None:
        exprs.append(_match(_addr_field(rule.family, remote), f"@{rule.peer}"))
    if rule.protocol == "l4":
        exprs.append(_match({"concat": [{"meta": {"key": "l4proto"}},
                                        {"payload": {"protocol": "th", "field": "dport"}}]},
                            f"@{rule.ports}"))
    elif rule.protocol is not None:
        if rule.ports is None:
            exprs.append(_match({"meta": {"key": "l4proto"}}, rule.protocol))
        else:
            right = f"@{rule.ports}" if isinstance(rule.ports, str) else _port_value(rule.ports)
            exprs.append(_match({"payload": {"protocol": rule.protocol, "field": "dport"}},
                                right))
    exprs.append({"goto": {"target": "egress_allowed"}} if rule.direction == "egress"
                 else {"accept": None})
    return exprs


def _set_command(verb: str, name: str, elements: Iterable[Any]) -> dict[str, Any]:
    return {verb: {"element": {"family": FAMILY, "table": TABLE, "name": name,
                               "elem": list(elements)}}}


def render(rules: HostRules) -> list[dict[str, Any]]:
    """The whole table as one nftables JSON batch: created if absent, then deleted and
    built again, all in one transaction (the kernel swaps it whole or not at all)."""
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[dict[str, Any]] = [{"add": {"table": table}}, {"delete": {"table": table}},
                                  {"add": {"table": table}}]

    def chain(name: str, **base: Any) -> None:
        cmds.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name,
                                       **base}}})

    def rule(chain_name: str, exprs: list[dict[str, Any]], comment: str | None = None) -> None:
        body: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": chain_name,
                                "expr": exprs}
        if comment:
            body["comment"] = comment
        cmds.append({"add": {"rule": body}})

    chain("forward", type="filter", hook="forward", prio=0, policy="accept")
    chain("prerouting", type="filter", hook="prerouting", prio=PREROUTING_PRIORITY,
          policy="accept")
    for name in CHAINS:
        chain(name)
    for name, ranges in rules.port_sets:
        cmds.append({"add": {"set": {
            "family": FAMILY, "table": TABLE, "name": name, "type": "inet_service",
            "flags": ["interval"], "elem": [_port_value((r,)) for r in ranges]}}})
    for name, entries in rules.l4_sets:
        cmds.append({"add": {"set": {
            "family": FAMILY, "table": TABLE, "name": name,
            "type": ["inet_proto", "inet_service"], "flags": ["interval"],
            "elem": [{"concat": [proto, _port_value(((low, high),))]}
                     for proto, low, high in entries]}}})
    for address_set in rules.sets:
        body: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": address_set.name,
                                "type": "ipv4_addr" if address_set.family == 4 else "ipv6_addr"}
        if address_set.interval:
            body["flags"] = ["interval"]
        if address_set.elements:
            body["elem"] = [_element(a, address_set.interval)
                            for a in sorted(address_set.elements)]
        cmds.append({"add": {"set": body}})
    for exprs in _spoof_exprs():
        rule("prerouting", exprs, SPOOF_COMMENT)
    rule("forward", [_match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                     {"accept": None}], "replies of allowed connections")
    rule("forward", [_match({"meta": {"key": "iifname"}}, WORKLOAD_IFACES),
                     {"jump": {"target": "egress"}}], "from a workload of this host")
    rule("forward", [_match({"meta": {"key": "oifname"}}, WORKLOAD_IFACES),
                     {"jump": {"target": "ingress"}}], "to a workload of this host")
    for direction in ("egress", "ingress"):
        rule(direction, [{"jump": {"target": RULE_CHAINS[direction]}}],
             f"the policies' {direction} rules")
        role = "saddr" if direction == "egress" else "daddr"
        for family in rules.families:
            rule(direction, [_match(_addr_field(family, role), f"@iso_{direction}_{family}"),
                             {"jump": {"target": "deny"}}], f"isolated for {direction}")
    rule("egress_allowed", [_match({"meta": {"key": "oifname"}}, WORKLOAD_IFACES),
                            {"jump": {"target": "ingress"}}], "to a workload of this host")
    rule("egress_allowed", [{"accept": None}], "allowed by an egress policy")
    grouped = rules.by_chain()
    for name, (direction, key) in rules.policy_chains().items():
        chain(name)
        rule(RULE_CHAINS[direction], [{"jump": {"target": name}}], key)
        for nft_rule in grouped[name]:
            rule(name, _rule_exprs(nft_rule), nft_rule.comment)
    rule("deny", [_match({"meta": {"key": "l4proto"}}, "tcp"),
                  {"reject": {"type": "tcp reset"}}], "denied by network policy")
    rule("deny", [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
         "denied by network policy")
    return cmds


def _spoof_exprs() -> list[list[dict[str, Any]]]:
    """The anti-spoofing rules (see SPOOF_COMMENT), as `render` gives them."""
    iif = _match({"meta": {"key": "iifname"}}, WORKLOAD_IFACES)
    fib = _match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, False)
    saddr6 = _addr_field(6, "saddr")
    return [[iif, _match({"meta": {"key": "nfproto"}}, "ipv4"), fib, {"drop": None}],
            [iif, _match(saddr6, {"prefix": {"addr": "fe80::", "len": 10}}, "!="),
             _match(saddr6, "::", "!="), fib, {"drop": None}]]


def element_changes(old: HostRules, new: HostRules) -> list[dict[str, Any]]:
    """Set element deletions and additions turning `old` into `new`, in the dynamic sets
    both have (a set only `new` has is created with its elements)."""
    before = old.dynamic()
    after = {k: v for k, v in new.dynamic().items() if k in before}
    cmds = []
    for name in sorted(after):
        gone = before.get(name, frozenset()) - after[name]
        if gone:
            cmds.append(_set_command("delete", name, sorted(gone)))
    for name in sorted(after):
        came = after[name] - before.get(name, frozenset())
        if came:
            cmds.append(_set_command("add", name, sorted(came)))
    return cmds


@dataclass(frozen=True)
class PolicyReport:
    """What one apply or check did (reported to the owner loop)."""

    ok: bool
    full: bool = False  # the whole table was replaced
    changes: int = 0  # commands in the batch
    seconds: float = 0.0
    error: str = ""
    drift: tuple[str, ...] = ()  # what a check found different
    digest: str = ""  # of the rules applied
    structural: bool = False  # rules and sets added and deleted (not the whole table)


# -- the same, as nft's own language ----------------------------------------------------
# libnftables parses its native syntax faster than JSON (about 20% for a big table) and
# the text is cheaper to build: the adapter applies this; `render` is the same table as
# data (tests, `policy explain`), and the adapter's test checks the kernel's listing of
# the text against it.
def _text_ports(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def _text_match(rule: NftRule) -> str:
    ip = "ip" if rule.family == 4 else "ip6"
    local, remote = ("daddr", "saddr") if rule.direction == "ingress" else ("saddr", "daddr")
    parts = [f"{ip} {local} @{rule.subject}"]
    if rule.peer is not None:
        parts.append(f"{ip} {remote} @{rule.peer}")
    if rule.protocol == "l4":
        parts.append(f"meta l4proto . th dport @{rule.ports}")
    elif rule.protocol is not None:
        if rule.ports is None:
            parts.append(f"meta l4proto {rule.protocol}")
        elif isinstance(rule.ports, str):
            parts.append(f"{rule.protocol} dport @{rule.ports}")
        else:
            parts.append(f"{rule.protocol} dport {_text_ports(rule.ports)}")
    return " ".join(parts)


def _text_rule(rule: NftRule) -> str:
    verdict = "goto egress_allowed" if rule.direction == "egress" else "accept"
    return f'{_text_match(rule)} {verdict} comment "{rule.comment}"'


def _text_set(name: str, body: str) -> str:
    return f"set {name} {{ {body} }}"


def _text_sets(rules: HostRules, names: set[str] | None = None) -> list[tuple[str, str]]:
    """(name, body) of every set of `rules` (only `names`, when given)."""
    out = []
    for name, ranges in rules.port_sets:
        out.append((name, f"type inet_service; flags interval; "
                          f"elements = {{ {_text_ports(ranges)} }};"))
    for name, entries in rules.l4_sets:
        items = ", ".join(f"{proto} . {_text_ports(((low, high),))}"
                          for proto, low, high in entries)
        out.append((name, f"type inet_proto . inet_service; flags interval; "
                          f"elements = {{ {items} }};"))
    for address_set in rules.sets:
        kind = "ipv4_addr" if address_set.family == 4 else "ipv6_addr"
        flags = " flags interval;" if address_set.interval else ""
        elements = f" elements = {{ {', '.join(sorted(address_set.elements))} }};" \
            if address_set.elements else ""
        out.append((address_set.name, f"type {kind};{flags}{elements}"))
    return [(n, b) for n, b in out if names is None or n in names]


def _text_prerouting() -> list[str]:
    """The anti-spoofing chain's body (see `_spoof_exprs`) in nft's language."""
    return [f"type filter hook prerouting priority {PREROUTING_PRIORITY}; policy accept;",
            f'iifname "{WORKLOAD_IFACES}" meta nfproto ipv4 fib saddr . iif oif missing '
            f'drop comment "{SPOOF_COMMENT}"',
            f'iifname "{WORKLOAD_IFACES}" ip6 saddr != fe80::/10 ip6 saddr != :: '
            f'fib saddr . iif oif missing drop comment "{SPOOF_COMMENT}"']


def spoof_guard_text() -> str:
    """Only the anti-spoofing chain, put in place (made, or flushed and filled again)
    without touching the rest of the table: for an ADD before the agent's view of etcd
    is complete, when the policies' rules cannot be computed yet but no workload may
    send with a forged source regardless."""
    body = _text_prerouting()
    where = f"{FAMILY} {TABLE}"
    return "\n".join([f"table {where} {{", "chain prerouting {", body[0], "}", "}",
                      f"flush chain {where} prerouting",
                      *[f"add rule {where} prerouting {rule}" for rule in body[1:]]]) + "\n"


def render_text(rules: HostRules) -> str:
    """`render` in nft's language: one transaction, the table created if absent, deleted
    and built again. The policies' rules come last, egress_rules' then ingress_rules',
    each in the order of `rules.rules` (what `rule_handles` relies on)."""
    lines = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}",
             f"table {FAMILY} {TABLE} {{"]
    lines += [_text_set(name, body) for name, body in _text_sets(rules)]
    lines += ["chain prerouting {", *_text_prerouting(), "}"]
    lines += ["chain forward {",
              "type filter hook forward priority 0; policy accept;",
              'ct state established,related accept comment "replies of allowed connections"',
              f'iifname "{WORKLOAD_IFACES}" jump egress comment "from a workload of this host"',
              f'oifname "{WORKLOAD_IFACES}" jump ingress comment "to a workload of this host"',
              "}"]
    for direction in ("egress", "ingress"):
        lines += [f"chain {direction} {{",
                  f'jump {RULE_CHAINS[direction]} comment "the policies\' {direction} rules"']
        role = "saddr" if direction == "egress" else "daddr"
        for family in rules.families:
            ip = "ip" if family == 4 else "ip6"
            lines.append(f'{ip} {role} @iso_{direction}_{family} jump deny '
                         f'comment "isolated for {direction}"')
        lines.append("}")
    lines += ["chain egress_allowed {",
              f'oifname "{WORKLOAD_IFACES}" jump ingress comment "to a workload of this host"',
              'accept comment "allowed by an egress policy"', "}",
              "chain deny {",
              'meta l4proto tcp reject with tcp reset comment "denied by network policy"',
              'reject with icmpx admin-prohibited comment "denied by network policy"', "}"]
    chains = rules.policy_chains()
    grouped = rules.by_chain()
    for name in chains:
        lines.append(f"chain {name} {{")
        lines += [_text_rule(r) for r in grouped[name]]
        lines.append("}")
    for direction in ("egress", "ingress"):
        lines.append(f"chain {RULE_CHAINS[direction]} {{")
        lines += [_text_dispatch(name, key) for name, (d, key) in chains.items()
                  if d == direction]
        lines.append("}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _text_dispatch(chain: str, key: str) -> str:
    return f'jump {chain} comment "{key}"'


def element_changes_text(old: HostRules, new: HostRules) -> str:
    """`element_changes` in nft's language (empty when nothing changes)."""
    lines = []
    for cmd in element_changes(old, new):
        verb = next(iter(cmd))
        body = cmd[verb]["element"]
        lines.append(f"{verb} element {FAMILY} {TABLE} {body['name']} "
                     f"{{ {', '.join(body['elem'])} }}")
    return "\n".join(lines) + ("\n" if lines else "")


def _set_names(rules: HostRules) -> set[str]:
    return ({s.name for s in rules.sets} | {n for n, _ in rules.port_sets}
            | {n for n, _ in rules.l4_sets})


def structure_changes_text(old: HostRules, new: HostRules, handles: Mapping[str, int]
                           ) -> tuple[str, list[str]] | None:
    """`old` -> `new` as one transaction that touches only what changed: the chains of
    policies that went are emptied and deleted (with the jump to them: `handles` maps a
    policy chain to the handle of that jump), a changed policy's chain is flushed and
    filled again, new policies' chains are made and jumped to, sets come and go, the sets
    both keep change elements. Returns (the text, the policy chains it adds jumps to, in
    order), or None when that cannot be done (another set of families, or the handle of a
    jump to delete is unknown): then the table is replaced."""
    if old.families != new.families:
        return None
    old_chains, new_chains = old.policy_chains(), new.policy_chains()
    gone = [c for c in old_chains if c not in new_chains]
    if any(c not in handles for c in gone):
        return None
    came = [c for c in new_chains if c not in old_chains]
    old_rules, new_rules = old.by_chain(), new.by_chain()
    changed = [c for c in new_chains if c in old_chains and old_rules[c] != new_rules[c]]
    old_sets, new_sets = _set_names(old), _set_names(new)
    old_bodies = dict(_text_sets(old))
    # A set kept by name whose static contents changed cannot happen (static sets are
    # named after their contents); one whose type changed would: replace the table.
    if any(b.split(";")[0] != old_bodies[n].split(";")[0]
           for n, b in _text_sets(new, old_sets & new_sets)):
        return None
    where = f"{FAMILY} {TABLE}"
    lines = []
    for chain in gone:
        rules_chain = RULE_CHAINS[old_chains[chain][0]]
        lines += [f"delete rule {where} {rules_chain} handle {handles[chain]}",
                  f"flush chain {where} {chain}", f"delete chain {where} {chain}"]
    lines += [f"flush chain {where} {chain}" for chain in changed]
    lines += [f"delete set {where} {name}" for name in sorted(old_sets - new_sets)]
    lines += [f"add {_text_set(f'{where} {n}', b)}"
              for n, b in _text_sets(new, new_sets - old_sets)]
    lines += element_changes_text(old, new).splitlines()
    for chain in changed:
        lines += [f"add rule {where} {chain} {_text_rule(r)}" for r in new_rules[chain]]
    for chain in came:
        direction, key = new_chains[chain]
        lines.append(f"add chain {where} {chain}")
        lines += [f"add rule {where} {chain} {_text_rule(r)}" for r in new_rules[chain]]
        lines.append(f"add rule {where} {RULE_CHAINS[direction]} {_text_dispatch(chain, key)}")
    return "\n".join(lines) + ("\n" if lines else ""), came


def new_handles(listed: Mapping[str, Sequence[int]], added: Sequence[tuple[str, str]],
                known: Iterable[int] = ()) -> dict[str, int]:
    """The handles nft gave the jumps to `added` policy chains ((rules chain, policy
    chain), in the order the jumps were added): per rules chain, the listed handles (in
    chain order) that are not `known`. Each `add rule` appends, and a whole table's
    jumps are built in `policy_chains()` order."""
    seen = set(known)
    out: dict[str, int] = {}
    for rules_chain in RULE_CHAINS.values():
        fresh = [h for h in listed.get(rules_chain, ()) if h not in seen]
        mine = [chain for where, chain in added if where == rules_chain]
        if len(fresh) != len(mine):
            raise ValueError(f"chain {rules_chain}: {len(fresh)} new jumps listed, "
                             f"{len(mine)} added")
        out.update(zip(mine, fresh, strict=True))
    return out


def jumps(rules: HostRules, chains: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(rules chain, policy chain) of the jumps to `chains` (default: all), in order."""
    table = rules.policy_chains()
    return [(RULE_CHAINS[table[c][0]], c) for c in (table if chains is None else chains)]


# -- reading a listed ruleset back -------------------------------------------------------
_BASE_KEYS = ("type", "hook", "prio", "policy")


@dataclass(frozen=True)
class Listed:
    """A table as `nft -j list table` gave it: chains' rules in order, base chains' hook,
    priority and policy, sets' elements."""

    chains: Mapping[str, tuple[Mapping[str, Any], ...]]
    sets: Mapping[str, tuple[Any, ...]]
    bases: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, listing: Iterable[Mapping[str, Any]]) -> Listed:
        chains: dict[str, list[Mapping[str, Any]]] = {}
        sets: dict[str, tuple[Any, ...]] = {}
        bases: dict[str, tuple[Any, ...]] = {}
        for item in listing:
            if "chain" in item and item["chain"].get("table") == TABLE:
                chain = item["chain"]
                chains.setdefault(chain["name"], [])
                if "hook" in chain:
                    bases[chain["name"]] = tuple(chain.get(k) for k in _BASE_KEYS)
            elif "rule" in item and item["rule"].get("table") == TABLE:
                chains.setdefault(item["rule"]["chain"], []).append(item["rule"])
            elif "set" in item and item["set"].get("table") == TABLE:
                sets[item["set"]["name"]] = tuple(item["set"].get("elem") or ())
        return cls({k: tuple(v) for k, v in chains.items()}, sets, bases)

    @classmethod
    def from_batch(cls, commands: Iterable[Mapping[str, Any]]) -> Listed:
        """What the kernel should list after a `render()` batch was applied."""
        return cls.parse(cmd["add"] for cmd in commands if "add" in cmd)

    def summary(self) -> dict[str, Any]:
        """What drift is judged on: base chains' hook, priority and policy; every rule
        whole (its expressions, normalised, and its comment); sets' elements. Equal
        for a faithfully applied table and `expected_summary`, so a rule edited by
        hand under the same comment is drift too."""
        return {"bases": dict(sorted(self.bases.items())),
                "chains": {name: _ordered(name, [_rule_key(r) for r in rules])
                           for name, rules in sorted(self.chains.items())},
                "sets": {name: sorted(_element_key(e) for e in elements)
                         for name, elements in sorted(self.sets.items())}}


def _rule_key(rule: Mapping[str, Any]) -> str:
    """One rule as a canonical string: `comment: [expressions]`."""
    exprs = [_normal(e) for e in rule.get("expr", ()) if "counter" not in e]
    return f"{rule.get('comment', '')}: {json.dumps(exprs, sort_keys=True)}"


def _normal(value: Any) -> Any:
    """An expression as nft lists it and as `render` writes it, made one: one-element
    lists (nft lists a single flag or state bare), set literals and prefixes."""
    if isinstance(value, dict):
        if set(value) == {"set"}:
            items = value["set"] if isinstance(value["set"], list) else [value["set"]]
            return {"set": sorted((_normal(i) for i in items), key=json.dumps)}
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_normal(v) for v in value]
        return items[0] if len(items) == 1 else items
    return value


def _element_key(element: Any) -> str:
    if isinstance(element, dict) and "prefix" in element:
        prefix = element["prefix"]
        return interval_key(f"{prefix['addr']}/{prefix['len']}")
    if isinstance(element, dict) and "range" in element:
        low, high = element["range"]
        if isinstance(low, str):
            return interval_key(f"{low}-{high}")
        return f"{low}-{high}"
    if isinstance(element, str) and (":" in element or element.count(".") == 3):
        return interval_key(element)
    if isinstance(element, dict) and "elem" in element:
        return _element_key(element["elem"]["val"])
    if isinstance(element, dict) and "concat" in element:
        return " . ".join(_element_key(part) for part in element["concat"])
    return str(element)


def _ordered(chain: str, comments: list[str]) -> list[str]:
    """The policies' rule chains are judged as sets (their order does not matter and
    changes as rules come and go); the others in order."""
    return sorted(comments) if chain in RULE_CHAINS.values() else comments


def expected_summary(rules: HostRules) -> dict[str, Any]:
    """The summary `Listed.summary()` gives for a faithfully applied `rules`: read from
    the same table as data (`render`), so there is one description of the table."""
    return Listed.from_batch(render(rules)).summary()


@dataclass(frozen=True)
class Packet:
    """The first packet of a connection as the forward hook sees it on one host."""

    saddr: str
    daddr: str
    protocol: str  # tcp, udp, sctp
    dport: int
    iifname: str  # l3f... when it comes from a workload of this host
    oifname: str  # l3f... when it goes to one
    ct_state: str = "new"


class UnknownExpression(ValueError):
    """The listed ruleset holds something this reader does not know: not ours."""


def _in_set(value: Any, elements: Iterable[Any]) -> bool:
    for element in elements:
        if isinstance(element, dict) and "elem" in element:
            element = element["elem"]["val"]
        if isinstance(value, tuple):
            parts = element.get("concat") if isinstance(element, dict) else None
            if parts is not None and len(parts) == len(value) and all(
                    _in_set(v, [p]) for v, p in zip(value, parts, strict=True)):
                return True
            continue
        if isinstance(element, dict) and "prefix" in element:
            prefix = element["prefix"]
            try:
                if ipaddress.ip_address(value) in ipaddress.ip_network(
                        f"{prefix['addr']}/{prefix['len']}"):
                    return True
            except (TypeError, ValueError):
                continue
        elif isinstance(element, dict) and "range" in element:
            low, high = element["range"]
            if isinstance(value, int) and isinstance(low, int) and low <= value <= high:
                return True
            if isinstance(value, str) and not isinstance(low, int):
                ip, first, last = (int(ipaddress.ip_address(x)) for x in (value, low, high))
                if (":" in value) == (":" in str(low)) and first <= ip <= last:
                    return True
        elif isinstance(value, str) and isinstance(element, str) and ":" in value + element:
            try:
                if ipaddress.ip_address(value) == ipaddress.ip_address(element):
                    return True
            except ValueError:
                continue
        elif element == value:
            return True
    return False


def _field(left: Mapping[str, Any], packet: Packet) -> tuple[bool, Any]:
    """(applies, value): a payload match on another protocol does not apply (fails)."""
    family = 6 if ":" in packet.saddr else 4
    if "concat" in left:
        parts = [_field(part, packet) for part in left["concat"]]
        if not all(applies for applies, _ in parts):
            return False, None
        return True, tuple(value for _, value in parts)
    if "meta" in left:
        key = left["meta"]["key"]
        if key == "iifname":
            return True, packet.iifname
        if key == "oifname":
            return True, packet.oifname
        if key == "l4proto":
            return True, packet.protocol
        if key == "nfproto":
            return True, "ipv6" if family == 6 else "ipv4"
    elif "ct" in left and left["ct"]["key"] == "state":
        return True, packet.ct_state
    elif "payload" in left:
        protocol, name = left["payload"]["protocol"], left["payload"]["field"]
        if protocol in ("ip", "ip6"):
            if (protocol == "ip6") != (family == 6):
                return False, None
            if name in ("saddr", "daddr"):
                return True, getattr(packet, name)
        elif protocol in ("tcp", "udp", "sctp", "th") and name == "dport":
            if protocol != "th" and protocol != packet.protocol:
                return False, None
            return True, packet.dport
    raise UnknownExpression(f"unknown match {json.dumps(left)}")


def _matches(match: Mapping[str, Any], packet: Packet, sets: Mapping[str, tuple[Any, ...]]
             ) -> bool:
    applies, value = _field(match["left"], packet)
    if not applies:
        return False
    right, op = match["right"], match.get("op", "==")
    if isinstance(right, str) and right.startswith("@"):
        hit = _in_set(value, sets.get(right[1:], ()))
    elif isinstance(right, dict) and "set" in right:
        hit = _in_set(value, right["set"])
    elif isinstance(right, list):
        hit = value in right if op == "in" else _in_set(value, right)
    elif isinstance(right, dict) and "range" in right:
        hit = _in_set(value, [right])
    elif isinstance(right, str) and right.endswith("*") and isinstance(value, str):
        hit = value.startswith(right[:-1])
    else:
        hit = _in_set(value, [right])
    return not hit if op == "!=" else hit


def evaluate(listed: Listed, packet: Packet) -> tuple[str, list[str]]:
    """The verdict of the forward hook for `packet` ("accept" or "reject"/"drop") and
    the comments of the rules that decided along the way."""
    trail: list[str] = []

    def run(chain: str, depth: int = 0) -> str | None:
        if depth > 16:
            raise UnknownExpression("jumps nest too deep")
        for rule in listed.chains.get(chain, ()):
            verdict = None
            matched = True
            for expr in rule["expr"]:
                if "match" in expr:
                    if not _matches(expr["match"], packet, listed.sets):
                        matched = False
                        break
                elif "counter" in expr:
                    continue
                else:
                    verdict = expr
                    break
            if not matched or verdict is None:
                continue
            comment = rule.get("comment", "")
            label = {"pi_": "ingress_rules", "pe_": "egress_rules"}.get(chain[:3], chain)
            if "return" in verdict:
                trail.append(f"{label}: {comment} (allowed)")
                return None
            if "jump" in verdict or "goto" in verdict:
                target = (verdict.get("jump") or verdict.get("goto"))["target"]
                if comment and target not in RULE_CHAINS.values() \
                        and chain not in RULE_CHAINS.values():
                    trail.append(f"{label}: {comment}")
                outcome = run(target, depth + 1)
                if outcome is not None or "goto" in verdict:
                    return outcome
                continue
            for final in ("accept", "drop", "reject"):
                if final in verdict:
                    trail.append(f"{label}: {comment} ({final})")
                    return final
            raise UnknownExpression(f"unknown verdict {json.dumps(verdict)}")
        return None

    outcome = run("forward")
    return outcome or "accept", trail
