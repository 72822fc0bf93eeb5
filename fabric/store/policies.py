"""Network policies, namespace labels and workload labels in etcd.

Every write that can race is one transaction with compares, retried when another
writer got there first:

* applying policies: each policy key compared as read (absent, or unchanged since
  read), all written in one transaction (etcd takes at most 128 operations in one:
  more documents are applied in consecutive transactions, after every one of them was
  validated);
* labelling a namespace or a workload: the record compared by revision, so two
  `label` commands at once both land and an ADD or DEL meanwhile is never undone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fabric.model import checks
from fabric.model.nodes import Workload
from fabric.model.policy import DEFAULT_NAMESPACE, NetworkPolicy, PolicyError, parse_policy
from fabric.store import keys
from fabric.store.datastore import Datastore, Entry, absent, delete, get_op, put, unchanged

MAX_OPS = 128
RETRIES = 50


class LabelError(ValueError):
    """A label change that cannot be made (no such workload, an ambiguous name)."""


@dataclass(frozen=True)
class Applied:
    key: str  # NS/NAME
    outcome: str  # created, configured, unchanged


def _backoff(attempt: int) -> None:
    time.sleep(min(0.005 * 2 ** attempt, 0.2))


def apply_policies(store: Datastore, policies: Sequence[NetworkPolicy]) -> list[Applied]:
    seen: dict[str, NetworkPolicy] = {}
    for policy in policies:
        seen[policy.key] = policy  # a later document of the same name wins, as kubectl
    ordered = list(seen.values())
    out: list[Applied] = []
    for start in range(0, len(ordered), MAX_OPS // 2):
        out += _apply_chunk(store, ordered[start:start + MAX_OPS // 2])
    return out


def _apply_chunk(store: Datastore, policies: Sequence[NetworkPolicy]) -> list[Applied]:
    for attempt in range(RETRIES):
        rows = store.read_many([get_op(keys.policy(p.namespace, p.name)) for p in policies])
        compares: list[Any] = []
        writes: list[Any] = []
        out = []
        for policy, row in zip(policies, rows, strict=True):
            key = keys.policy(policy.namespace, policy.name)
            current = row[0] if row and isinstance(row[0], Entry) else None
            if current is None:
                compares.append(absent(key))
                outcome = "created"
            else:
                compares.append(unchanged(key, current.mod_revision))
                outcome = "unchanged" if current.value == policy.to_record() else "configured"
            if outcome != "unchanged":
                writes.append(put(key, policy.to_record()))
            out.append(Applied(policy.key, outcome))
        if not writes:
            return out
        ok, _ = store.txn(compares, writes)
        if ok:
            return out
        _backoff(attempt)
    raise PolicyError("", "policies changed by someone else on every attempt; try again")


class UnreadablePolicy(ValueError):
    """A policy record that does not parse (written by etcdctl, or another version)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"policy record {key} does not parse: {reason}")
        self.key = key
        self.reason = reason


def _parse_record(key: str, value: Any) -> NetworkPolicy:
    try:
        return parse_policy(value["manifest"])
    except checks.NOT_A_RECORD as exc:
        raise UnreadablePolicy(key, str(exc) or type(exc).__name__) from exc


def read_policies(store: Datastore, namespace: str | None = None
                  ) -> tuple[list[NetworkPolicy], dict[str, str]]:
    """(the policies that parse, sorted; {key: why} of the records that do not, which a
    listing must name rather than hide: the agents enforce them fail-closed)."""
    prefix = keys.policies_prefix(namespace) if namespace else keys.POLICIES
    listing = store.list(prefix)
    skipped = {bad.key: bad.reason for bad in listing.corrupt}
    found = []
    for entry in listing.entries:
        try:
            found.append(_parse_record(entry.key, entry.value))
        except UnreadablePolicy as exc:
            skipped[exc.key] = exc.reason
    return sorted(found, key=lambda p: p.key), skipped


def policies(store: Datastore, namespace: str | None = None) -> list[NetworkPolicy]:
    """The policies that parse (`read_policies` also says which records do not)."""
    return read_policies(store, namespace)[0]


def policy(store: Datastore, namespace: str, name: str) -> NetworkPolicy | None:
    """One policy, None when there is none; UnreadablePolicy when its record does not
    parse."""
    key = keys.policy(namespace, name)
    entry = store.get(key)
    return _parse_record(key, entry.value) if entry else None


def remove_policy(store: Datastore, namespace: str, name: str) -> bool:
    key = keys.policy(namespace, name)
    entry = store.get(key)
    if entry is None:
        return False
    ok, _ = store.txn([unchanged(key, entry.mod_revision)], [delete(key)])
    return ok


# -- namespaces ----------------------------------------------------------------------------
def namespaces(store: Datastore) -> dict[str, dict[str, str]]:
    """Namespaces with labels set (the automatic metadata.name label is not stored)."""
    out = {}
    for entry in store.list(keys.NAMESPACES).entries:
        name = entry.value.get("name")
        if isinstance(name, str):
            out[name] = {str(k): str(v) for k, v in (entry.value.get("labels") or {}).items()}
    return out


def _relabel(current: Mapping[str, str], set_: Mapping[str, str], remove: Iterable[str]
             ) -> dict[str, str]:
    labels = {**current, **set_}
    for key in remove:
        labels.pop(key, None)
    return labels


def label_namespace(store: Datastore, name: str, set_: Mapping[str, str],
                    remove: Iterable[str]) -> dict[str, str]:
    remove = list(remove)
    key = keys.namespace(name)
    for attempt in range(RETRIES):
        entry = store.get(key)
        current = dict((entry.value.get("labels") or {}) if entry else {})
        labels = _relabel(current, set_, remove)
        compare = unchanged(key, entry.mod_revision) if entry else absent(key)
        ok, _ = store.txn([compare], [put(key, {"name": name, "labels": labels})])
        if ok:
            return labels
        _backoff(attempt)
    raise LabelError(f"namespace {name} changed by someone else on every attempt; try again")


# -- workloads -----------------------------------------------------------------------------
def find_workload(store: Datastore, reference: str) -> tuple[Entry, Workload]:
    """A workload by `NS/NAME`, `NAME` (unique), handle or address."""
    matches = []
    for entry in store.list(keys.WORKLOADS).entries:
        try:
            record = Workload.from_record(entry.value)
        except checks.NOT_A_RECORD:
            continue
        namespace = record.namespace or DEFAULT_NAMESPACE
        if reference in (f"{namespace}/{record.name}", record.name, record.handle) \
                or reference in record.ips:
            matches.append((entry, record))
    if not matches:
        raise LabelError(f"no workload {reference} (use NAMESPACE/NAME, NAME, a handle or "
                         "an address)")
    if len(matches) > 1:
        names = ", ".join(sorted(f"{r.namespace or DEFAULT_NAMESPACE}/{r.name}"
                                 for _, r in matches))
        raise LabelError(f"{reference} names {len(matches)} workloads ({names}): use "
                         "NAMESPACE/NAME")
    return matches[0]


def label_workload(store: Datastore, reference: str, set_: Mapping[str, str],
                   remove: Iterable[str]) -> Workload:
    remove = list(remove)
    for attempt in range(RETRIES):
        entry, record = find_workload(store, reference)
        labels = _relabel(record.labels, set_, remove)
        updated = Workload(**{**record.__dict__, "labels": labels})
        ok, _ = store.txn([unchanged(entry.key, entry.mod_revision)],
                          [put(entry.key, updated.to_record())])
        if ok:
            return updated
        _backoff(attempt)
    raise LabelError(f"workload {reference} changed by someone else on every attempt; "
                     "try again")
