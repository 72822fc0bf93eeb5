"""The agent's nftables table: applied as one transaction, checked, repaired.

libnftables (the Debian `nftables` package's library, the one `nft` itself uses) is
called through ctypes: one `nft_run_cmd_from_buffer` call is one netlink transaction,
which the kernel commits whole or not at all, so there is never a moment with half a
ruleset. Rulesets go in as nft's own language (it parses faster than JSON); listings
come back as JSON.

`PolicyTable` owns the table `inet l3fabric` the way the kernel writer owns routes:

* `apply(rules)`: when only set elements changed since the last apply, one batch of
  element deletions and additions; otherwise (or when unsure: first apply after a
  start, after a failure) the whole table replaced in one batch. The table is never
  flushed or deleted on its own: an agent that restarts keeps enforcing the previous
  run's rules until its first apply swaps them atomically (no fail-open window).
* `check(rules)`: lists the table and compares it with what was applied (rules by
  comment, chains, set elements); a difference is drift: the table is replaced whole.
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
    TABLE,
    HostRules,
    Listed,
    PolicyReport,
    element_changes_text,
    expected_summary,
    render_text,
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
        """One command (text or a JSON batch); its output, or NftError with nft's message."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(" ".join(error.split())[:2000] or f"nft failed ({rc})")
        return output

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
        with self._lock:
            started = time.perf_counter()
            old = self.applied
            whole = full or old is None or old.structure() != rules.structure()
            commands = render_text(rules) if whole or old is None \
                else element_changes_text(old, rules)
            try:
                if commands:
                    self.nft.run(commands)
            except NftError as exc:
                self.applied = None  # unsure what the kernel holds: replace it whole next
                if whole:
                    return PolicyReport(False, True, commands.count("\n"),
                                        time.perf_counter() - started, str(exc))
                self.log.warning("element update refused; replacing the table", error=str(exc))
                commands = render_text(rules)
                whole = True
                try:
                    self.nft.run(commands)
                except NftError as exc2:
                    return PolicyReport(False, True, commands.count("\n"),
                                        time.perf_counter() - started, str(exc2))
            self.applied = rules
            return PolicyReport(True, whole, commands.count("\n"), time.perf_counter() - started,
                                digest=rules.digest())

    def check(self, rules: HostRules) -> PolicyReport:
        """Compare the kernel's table with `rules`; replace it whole if it differs."""
        with self._lock:
            started = time.perf_counter()
            try:
                listing = self.nft.list_table()
            except NftError as exc:
                return PolicyReport(False, error=str(exc), seconds=time.perf_counter() - started)
            drift = describe_drift(expected_summary(rules),
                                   Listed.parse(listing).summary() if listing is not None
                                   else None)
        if not drift:
            return PolicyReport(True, seconds=time.perf_counter() - started,
                                digest=rules.digest())
        self.log.warning("nftables table differs from what was applied; replacing it",
                         drift=list(drift)[:5])
        report = self.apply(rules, full=True)
        return PolicyReport(report.ok, True, report.changes, time.perf_counter() - started,
                            report.error, drift, report.digest)

    def remove(self) -> None:
        with self._lock:
            table = {"family": FAMILY, "name": TABLE}
            self.nft.batch([{"add": {"table": table}}, {"delete": {"table": table}}])
            self.applied = None

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None


def describe_drift(wanted: Mapping[str, Any], found: Mapping[str, Any] | None) -> tuple[str, ...]:
    if found is None:
        return ("table inet l3fabric is missing",)
    out = []
    for chain, comments in wanted["chains"].items():
        have = found["chains"].get(chain)
        if have is None:
            out.append(f"chain {chain} is missing")
        elif have != comments:
            out.append(f"chain {chain} has {len(have)} rules, {len(comments)} wanted")
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
