"""This host's network policy, as the owner loop sees it. Pure.

Inputs: the policies and namespace labels (two etcd mirrors), every workload's
registration (namespace, labels, addresses: the workloads mirror), and the CNI
handler's ADDs and DELs, which carry a new workload's namespace and labels so that its
rules can be computed before etcd's echo arrives. Output: the host's rule model
(`fabric.policy.compiler.HostRules`), which the owner loop hands to the kernel writer
whenever it changes.

Which workloads are this host's comes from `fabric.agent.workloads` (the same set the
host routes are computed from), so a workload is enforced exactly while it is routed:
its rules go in before its route (same queue, decided first) and its addresses leave
the sets when its DEL comes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.model import checks
from fabric.model.nodes import Workload
from fabric.model.policy import (
    DEFAULT_NAMESPACE,
    TYPES,
    Endpoint,
    NetworkPolicy,
    Selector,
    namespace_problem,
    parse_policy,
)
from fabric.policy.compiler import HostRules, PolicyReport, compile_host
from fabric.store import keys


@dataclass
class PolicyStats:
    applied: int = 0
    full: int = 0
    rule_updates: int = 0
    element_updates: int = 0
    failures: int = 0
    checks: int = 0
    repaired: int = 0
    last_error: str = ""
    last_apply_seconds: float = 0.0
    last_check_seconds: float = 0.0
    applied_digest: str = ""
    drift: list[str] = field(default_factory=list)


@dataclass
class PolicyView:
    node: str
    policies: tuple[NetworkPolicy, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)  # key -> why it was not read
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    registered: dict[str, Endpoint] = field(default_factory=dict)  # handle -> (all nodes)
    attached: dict[str, Endpoint] = field(default_factory=dict)  # handle -> (CNI ADD here)
    families: tuple[int, ...] = (4,)
    sent: HostRules | None = None  # the last rules handed to the kernel writer
    sent_digest: str = ""
    retry: bool = False  # the last apply failed: replace the table whole at the next tick
    in_flight: int = 0  # applies handed to the writer and not reported yet
    dirty: bool = False  # inputs changed while an apply was in flight
    stats: PolicyStats = field(default_factory=PolicyStats)
    _parsed: dict[str, tuple[Mapping[str, Any], NetworkPolicy]] = field(default_factory=dict)

    # -- inputs ------------------------------------------------------------------------
    def on_policies(self, records: Mapping[str, Mapping[str, Any]],
                    unreadable: Mapping[str, str] | None = None) -> None:
        """Every policy record, parsed (a record unchanged since the last snapshot is
        not parsed again: 1,000 manifests take about 0.2 s).

        A record that does not parse (written by etcdctl, a newer fabricctl, or not
        JSON at all: `unreadable`) fails closed, never open: dropping it would make
        the workloads it isolated reachable. Its last good version stays in force if
        this agent had one; otherwise it is enforced as deny-all, ingress and egress,
        in the namespace its key names (no real policy there can be stricter). Either
        way it is reported (`refused`, and `node status` says DEGRADED)."""
        found, refused = [], {}
        parsed: dict[str, tuple[Mapping[str, Any], NetworkPolicy]] = {}
        problems = dict(unreadable or {})
        for key, value in records.items():
            cached = self._parsed.get(key)
            if cached is not None and cached[0] == value:
                parsed[key] = cached
                found.append(cached[1])
                continue
            try:
                policy = parse_policy(dict(value["manifest"]))
            except checks.NOT_A_RECORD as exc:
                problems[key] = str(exc) or type(exc).__name__
                continue
            parsed[key] = (value, policy)
            found.append(policy)
        for key, why in problems.items():
            stand_in = fail_closed(key, self._parsed.get(key))
            if stand_in is None:
                refused[key] = f"{why} (its key names no namespace: nothing enforced)"
                continue
            refused[key] = f"{why}; enforcing {stand_in[0]}"
            found.append(stand_in[1])
            if key in self._parsed:
                parsed[key] = self._parsed[key]  # still the last good version
        self._parsed = parsed
        self.policies = tuple(sorted(found, key=lambda p: p.key))
        self.refused = refused

    def on_namespaces(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        spaces = {}
        for value in records.values():
            name = value.get("name")
            labels = value.get("labels") or {}
            if isinstance(name, str) and isinstance(labels, dict):
                spaces[name] = {str(k): str(v) for k, v in labels.items()}
        self.namespaces = spaces

    def on_workloads(self, records: Iterable[Workload]) -> None:
        self.registered = {r.handle: Endpoint.of(r) for r in records}
        # etcd caught up with an ADD: its registration is the newer truth (labels)
        for handle in set(self.attached) & set(self.registered):
            del self.attached[handle]

    def on_pools(self, families: Iterable[int]) -> None:
        self.families = tuple(sorted(set(families))) or (4,)

    def attach(self, handle: str, ips: Iterable[str], namespace: str,
               labels: Mapping[str, str], name: str, host_ifname: str) -> None:
        self.attached[handle] = Endpoint(handle, namespace or DEFAULT_NAMESPACE, name,
                                         dict(labels), tuple(ips), self.node, host_ifname)

    def detach(self, handle: str) -> None:
        self.attached.pop(handle, None)

    # -- output ------------------------------------------------------------------------
    def endpoints(self, local: Mapping[str, Any], detached: Iterable[str]
                  ) -> tuple[list[Endpoint], list[Endpoint]]:
        """(every workload of the fabric, this host's), with this host's as it routes them:
        `local` maps handle -> `fabric.agent.workloads.Known` (addresses)."""
        gone = set(detached)
        everyone = {h: e for h, e in self.registered.items() if h not in gone}
        everyone.update(self.attached)
        mine = []
        for handle, known in local.items():
            found = everyone.get(handle)
            if found is None:  # routed, registration vanished: enforce with no labels
                found = Endpoint(handle, DEFAULT_NAMESPACE, "", {}, tuple(known.ips), self.node)
            elif tuple(known.ips) != found.ips:
                found = Endpoint(found.handle, found.namespace, found.name, found.labels,
                                 tuple(known.ips), self.node, found.host_ifname)
            everyone[handle] = found
            mine.append(found)
        return list(everyone.values()), mine

    def desired(self, local: Mapping[str, Any], detached: Iterable[str]) -> HostRules:
        everyone, mine = self.endpoints(local, detached)
        return compile_host(self.policies, self.namespaces, everyone, mine, self.families)

    def on_report(self, report: PolicyReport, check: bool) -> None:
        stats = self.stats
        if check:
            stats.checks += 1
            stats.last_check_seconds = report.seconds
            if report.drift:
                stats.repaired += 1
                stats.drift = (list(report.drift) + stats.drift)[:20]
        if report.ok:
            if report.changes or report.full:
                stats.applied += 1
                stats.full += report.full
                stats.rule_updates += report.structural
                stats.element_updates += not report.full and not report.structural
                stats.last_apply_seconds = report.seconds
            stats.applied_digest = report.digest or stats.applied_digest
            stats.last_error = ""
            if not check:
                self.retry = False
        else:
            stats.failures += 1
            stats.last_error = report.error
            self.retry = True

    def status(self) -> dict[str, Any]:
        rules = self.sent
        stats = self.stats
        return {"policies": len(self.policies), "refused": dict(self.refused),
                "namespaces": len(self.namespaces),
                "local_workloads": rules.local if rules else 0,
                "rules": len(rules.rules) if rules else 0,
                "sets": len(rules.sets) if rules else 0,
                "wanted_digest": self.sent_digest, "applied_digest": stats.applied_digest,
                "in_sync": bool(rules) and stats.applied_digest == self.sent_digest
                and not self.retry and not self.dirty and not self.in_flight,
                "applied": stats.applied, "full_replacements": stats.full,
                "rule_updates": stats.rule_updates,
                "element_updates": stats.element_updates, "failures": stats.failures,
                "checks": stats.checks, "repaired": stats.repaired,
                "last_error": stats.last_error,
                "last_apply_seconds": stats.last_apply_seconds,
                "last_check_seconds": stats.last_check_seconds, "drift": list(stats.drift)}


def fail_closed(key: str, last_good: tuple[Mapping[str, Any], NetworkPolicy] | None
                ) -> tuple[str, NetworkPolicy] | None:
    """What to enforce for the policy record at `key` that does not parse: (how it is
    described, the policy). Its last good version if there is one, else deny-all
    (ingress and egress) in the namespace of its key (`<prefix>NS/NAME`); None when
    the key names no valid namespace (no workload can be in it)."""
    if last_good is not None:
        return "its last good version", last_good[1]
    namespace, _, name = key.removeprefix(keys.POLICIES).partition("/")
    if namespace_problem(namespace):
        return None
    # The name goes into rule comments: keep it to what a policy name may be.
    safe = name if re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,200}[a-z0-9])?", name) else \
        "unreadable-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return (f"deny-all (ingress and egress) in namespace {namespace}",
            NetworkPolicy(namespace, safe, Selector(), TYPES))
