"""The agent's nftables table: applied as one transaction, checked, repaired.

libnftables (the Debian `nftables` package's library, the one `nft` itself uses) is
called through ctypes: one `nft_run_cmd_from_buffer` call is one netlink transaction,
which the kernel commits whole or not at all, so there is never a moment with half a
ruleset. Rulesets go in as nft's own language (it parses faster than JSON); listings
come back as JSON.

`PolicyTable` owns the table `inet l3fabric` the way the kernel writer owns routes:

* `apply(rules)`: the smallest transaction that makes the table hold `rules`: set
  element deletions and additions when only they changed (workloads, labels); a
  policy's own chain flushed and filled again, or made or deleted with the one jump to
  it, and sets created or deleted, when policies changed; the whole table replaced when
  unsure (the first apply after a start, after a failure or drift) or when the address
  families changed. The table is never flushed or deleted on its own: an agent that
  restarts keeps enforcing the previous run's rules until its first apply swaps them
  atomically (no fail-open window).
* `check(rules)`: lists the table and compares it with what was applied (base chains'
  hooks, priorities and policies, every rule's expressions and comment, set
  elements); a difference is drift: the table is replaced whole.
* `remove()`: delete the table (tests, and an operator's `fabricctl` clean-up only).

It runs on the kernel writer's thread (see `fabric.kernel.writer.KernelWriter.call`),
so rules and routes reach the kernel in the order the owner loop decided them.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric import logs
from fabric.policy.compiler import (
    FAMILY,
    RULE_CHAINS,
    TABLE,
    HostRules,
    Listed,
    PolicyReport,
    element_changes_text,
    expected_summary,
    jumps,
    new_handles,
    render_text,
    spoof_guard_text,
    structure_changes_text,
)

OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
OUTPUT_HANDLE = 1 << 3


class NftError(RuntimeError):
    pass


class Nft:
    """One libnftables context; not thread-safe (use from one thread)."""

    def __init__(self, sofile: str = "libnftables.so.1") -> None:
        try:
            lib = ctypes.CDLL(sofile)
        except OSError as exc:
            raise NftError(f"{sofile} not found: install the Debian package nftables") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_int]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_JSON)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, command: str) -> str:
        """One command (text or a JSON batch); its output, or NftError with nft's message.

        (Not with the echo flag: libnftables 1.0.6 crashed echoing a whole table of ours;
        the policies' rules' handles are listed instead, see `rule_handles`.)"""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(" ".join(error.split())[:2000] or f"nft failed ({rc})")
        return output

    def rule_handles(self) -> dict[str, list[int]]:
        """The handles of the jumps to the policies' chains, in egress_rules and
        ingress_rules, in chain order (listed as text, which libnftables prints about
        twice as fast as JSON)."""
        out = {}
        self._lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_HANDLE)
        try:
            for chain in RULE_CHAINS.values():
                lines = self.run(f"list chain {FAMILY} {TABLE} {chain}").splitlines()
                out[chain] = [int(line.rpartition("# handle ")[2]) for line in lines
                              if "# handle " in line and not line.lstrip().startswith(
                                  ("table ", "chain "))]
        finally:
            self._lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_JSON)
        return out

    def batch(self, commands: Sequence[Mapping[str, Any]]) -> None:
        if commands:
            self.run(json.dumps({"nftables": list(commands)}))

    def list_table(self, family: str = FAMILY, table: str = TABLE) -> list[dict[str, Any]] | None:
        """The table as JSON objects, or None when it does not exist."""
        try:
            output = self.run(f"list table {family} {table}")
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        return list(json.loads(output).get("nftables", [])) if output.strip() else []

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


@dataclass
class PolicyTable:
    nft_factory: Callable[[], Nft] = Nft
    applied: HostRules | None = None  # what the kernel holds, as far as we know
    # policy chain -> the handle of the jump to it (in egress_rules or ingress_rules),
    # what deleting a policy needs. Jumps added whose handles are not known yet are
    # `pending` (in the order added): they are listed only when a change must delete
    # one, or read from the periodic check's listing.
    handles: dict[str, int] = field(default_factory=dict)
    pending: list[tuple[str, str]] = field(default_factory=list)
    log: Any = field(default_factory=lambda: logs.get("kernel.nftables"))

    def __post_init__(self) -> None:
        self._nft: Nft | None = None
        self._lock = threading.Lock()  # apply/check come from one thread; tests may not

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = self.nft_factory()
        return self._nft

    def apply(self, rules: HostRules, full: bool = False) -> PolicyReport:
        """Make the table hold `rules` in one transaction (see the module docstring);
        `full` replaces the table whatever changed."""
        with self._lock:
            started = time.perf_counter()
            old = self.applied
            self.applied = None  # unsure what the kernel holds until this succeeds
            if not full and old is not None:
                try:
                    report = self._update(old, rules, started)
                except (NftError, ValueError) as exc:
                    self.log.warning("table update refused; replacing the table",
                                     error=str(exc))
                else:
                    if report is not None:
                        self.applied = rules
                        return report
            text = render_text(rules)
            self.handles, self.pending = {}, jumps(rules)
            try:
                self.nft.run(text)
            except (NftError, ValueError) as exc:
                return PolicyReport(False, True, text.count("\n"),
                                    time.perf_counter() - started, str(exc))
            self.applied = rules
            return PolicyReport(True, True, text.count("\n"), time.perf_counter() - started,
                                digest=rules.digest())

    def _update(self, old: HostRules, rules: HostRules, started: float
                ) -> PolicyReport | None:
        """The change as set elements, or as policy chains and sets; None: replace the
        table instead."""
        if old.structure() == rules.structure():
            text = element_changes_text(old, rules)
            if text:
                self.nft.run(text)
            return PolicyReport(True, False, text.count("\n"), time.perf_counter() - started,
                                digest=rules.digest())
        kept = rules.policy_chains()
        if any(chain not in kept for _, chain in self.pending):
            self._resolve(self.nft.rule_handles())
        change = structure_changes_text(old, rules, self.handles)
        if change is None:
            return None
        text, added = change
        if text:
            self.nft.run(text)
        self.handles = {c: h for c, h in self.handles.items() if c in kept}
        self.pending = [j for j in self.pending if j[1] in kept] + jumps(rules, added)
        return PolicyReport(True, False, text.count("\n"), time.perf_counter() - started,
                            digest=rules.digest(), structural=True)

    def _resolve(self, listed: dict[str, list[int]]) -> None:
        """Learn the pending rules' handles from a listing of the policies' chains."""
        if self.pending:
            self.handles.update(new_handles(listed, self.pending, self.handles.values()))
            self.pending = []

    def check(self, rules: HostRules) -> PolicyReport:
        """Compare the kernel's table with `rules`; replace it whole if it differs."""
        with self._lock:
            started = time.perf_counter()
            try:
                listing = self.nft.list_table()
            except NftError as exc:
                return PolicyReport(False, error=str(exc), seconds=time.perf_counter() - started)
            listed = Listed.parse(listing) if listing is not None else None
            drift = describe_drift(expected_summary(rules),
                                   listed.summary() if listed is not None else None)
            if not drift and listed is not None and rules == self.applied:
                try:  # the listing has every handle: the pending ones come free
                    self._resolve({c: [r["handle"] for r in listed.chains.get(c, ())]
                                   for c in RULE_CHAINS.values()})
                except ValueError:
                    self.applied = None  # not what we think it is: replace it next time
        if not drift:
            return PolicyReport(True, seconds=time.perf_counter() - started,
                                digest=rules.digest())
        self.log.warning("nftables table differs from what was applied; replacing it",
                         drift=list(drift)[:5])
        report = self.apply(rules, full=True)
        return PolicyReport(report.ok, True, report.changes, time.perf_counter() - started,
                            report.error, drift, report.digest)

    def guard(self) -> None:
        """Put the anti-spoofing chain in place alone (`spoof_guard_text`), leaving every
        other chain and set as it is (a previous run's rules stay in force)."""
        with self._lock:
            self.nft.run(spoof_guard_text())

    def remove(self) -> None:
        with self._lock:
            table = {"family": FAMILY, "name": TABLE}
            self.nft.batch([{"add": {"table": table}}, {"delete": {"table": table}}])
            self.applied = None
            self.handles = {}

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None


def describe_drift(wanted: Mapping[str, Any], found: Mapping[str, Any] | None) -> tuple[str, ...]:
    if found is None:
        return ("table inet l3fabric is missing",)
    out = [f"base chain {name}: {found['bases'].get(name)} (type, hook, priority, policy), "
           f"{hook} wanted" for name, hook in wanted["bases"].items()
           if found["bases"].get(name) != hook]
    for chain, rules in wanted["chains"].items():
        have = found["chains"].get(chain)
        if have is None:
            out.append(f"chain {chain} is missing")
        elif have != rules:
            changed = sorted(set(have) ^ set(rules))
            out.append(f"chain {chain} has {len(have)} rules, {len(rules)} wanted; "
                       f"differing: {changed[:2]}")
    out += [f"chain {c} is not ours" for c in found["chains"] if c not in wanted["chains"]]
    for name, elements in wanted["sets"].items():
        have = found["sets"].get(name)
        if have is None:
            out.append(f"set {name} is missing")
        elif have != elements:
            missing = sorted(set(elements) - set(have))
            extra = sorted(set(have) - set(elements))
            out.append(f"set {name}: missing {missing[:3]}, extra {extra[:3]}")
    out += [f"set {s} is not ours" for s in found["sets"] if s not in wanted["sets"]]
    return tuple(out)
