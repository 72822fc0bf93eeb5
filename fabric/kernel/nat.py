"""Outgoing NAT for pools marked nat-outgoing: masquerade what leaves the fabric.

Traffic between containers is never translated: the rule matches a source inside a
nat-outgoing pool and a destination outside every pool. The rules live in our own
chain, hooked once from POSTROUTING, and are rewritten as a whole with
`iptables-restore --noflush` (atomic; other chains untouched).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

from fabric import logs

CHAIN = "L3FABRIC-NAT-OUTGOING"


class NatError(RuntimeError):
    pass


def rules(nat_pools: Iterable[str], all_pools: Iterable[str], family: int = 4) -> str:
    """An iptables-restore document for the nat table. Pure."""
    all_pools = sorted(p for p in all_pools if (":" in p) == (family == 6))
    lines = ["*nat", f":{CHAIN} - [0:0]", f"-F {CHAIN}"]
    for pool in sorted(p for p in nat_pools if (":" in p) == (family == 6)):
        # One RETURN per pool destination, then masquerade the rest.
        for dest in all_pools:
            lines.append(f"-A {CHAIN} -s {pool} -d {dest} -j RETURN")
        lines.append(f"-A {CHAIN} -s {pool} -j MASQUERADE")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class OutgoingNat:
    def __init__(self) -> None:
        self.log = logs.get("kernel.nat")
        self.binary = shutil.which("iptables-restore")
        self._hooked = False
        self._last = ""

    def apply(self, nat_pools: Iterable[str], all_pools: Iterable[str]) -> None:
        document = rules(nat_pools, all_pools)
        if document == self._last:
            return
        if self.binary is None:
            raise NatError("iptables-restore is not installed; nat-outgoing cannot work")
        self._run([self.binary, "--noflush"], document)
        if not self._hooked:
            check = subprocess.run(["iptables", "-t", "nat", "-C", "POSTROUTING", "-j", CHAIN],
                                   capture_output=True, check=False)
            if check.returncode != 0:
                self._run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-j", CHAIN], "")
            self._hooked = True
        self._last = document
        self.log.info("outgoing NAT rules applied", pools=sorted(nat_pools))

    def _run(self, argv: list[str], stdin: str) -> None:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NatError(f"{' '.join(argv)}: {result.stderr.strip()}")
