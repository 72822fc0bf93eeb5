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
    """Keeps our chain in the nat table of each family (IPv4 with iptables, IPv6 with
    ip6tables: NAT66 only for IPv6 pools that ask for it). Used from one thread only
    (the agent's host-jobs worker)."""

    TOOLS = {4: ("iptables", "iptables-restore"), 6: ("ip6tables", "ip6tables-restore")}

    def __init__(self) -> None:
        self.log = logs.get("kernel.nat")
        self._hooked: set[int] = set()
        self._last: dict[int, str] = {}
        self._inputs: dict[int, tuple[list[str], list[str]]] = {}

    def apply(self, nat_pools: Iterable[str], all_pools: Iterable[str]) -> None:
        nat_pools, all_pools = list(nat_pools), list(all_pools)
        for family in (4, 6):
            wanted = [p for p in nat_pools if (":" in p) == (family == 6)]
            if not wanted and family not in self._last:
                continue  # never had rules of this family: nothing to write or keep
            self._apply(family, wanted, all_pools)

    def _apply(self, family: int, nat_pools: list[str], all_pools: list[str]) -> None:
        document = rules(nat_pools, all_pools, family)
        if document == self._last.get(family):
            return
        tool, restore = self.TOOLS[family]
        binary = shutil.which(restore)
        if binary is None:
            raise NatError(f"{restore} is not installed; nat-outgoing cannot work")
        self._run([binary, "--noflush"], document)
        if family not in self._hooked:
            check = subprocess.run([tool, "-t", "nat", "-C", "POSTROUTING", "-j", CHAIN],
                                   capture_output=True, check=False)
            if check.returncode != 0:
                self._run([tool, "-t", "nat", "-A", "POSTROUTING", "-j", CHAIN], "")
            self._hooked.add(family)
        self._last[family] = document
        self._inputs[family] = (nat_pools, all_pools)
        self.log.info("outgoing NAT rules applied", family=family, pools=sorted(nat_pools))

    def verify(self) -> list[str]:
        """Put back what someone removed (a flushed nat table, a deleted jump): what
        `apply` wrote is checked against the kernel, and written again where it
        differs. Returns what was repaired."""
        repaired = []
        for family, document in list(self._last.items()):
            tool, _ = self.TOOLS[family]
            listed = subprocess.run([tool, "-t", "nat", "-S", CHAIN], capture_output=True,
                                    text=True, check=False)
            wanted = [line for line in document.splitlines() if line.startswith("-A ")]
            have = [line for line in listed.stdout.splitlines() if line.startswith("-A ")]
            hooked = subprocess.run([tool, "-t", "nat", "-C", "POSTROUTING", "-j", CHAIN],
                                    capture_output=True, check=False).returncode == 0
            if listed.returncode == 0 and _same_rules(have, wanted) and hooked:
                continue
            what = f"IPv{family} outgoing NAT " + ("rules" if hooked else "hook")
            self.log.warning("outgoing NAT changed outside the agent; writing it again",
                             family=family)
            del self._last[family]
            self._hooked.discard(family)
            self._apply(family, *self._inputs[family])
            repaired.append(what)
        return repaired

    def _run(self, argv: list[str], stdin: str) -> None:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NatError(f"{' '.join(argv)}: {result.stderr.strip()}")


def _same_rules(have: list[str], wanted: list[str]) -> bool:
    """iptables -S prints the rules it was given, normalised (a /32 mask kept)."""
    return [line.split() for line in have] == [line.split() for line in wanted]
