"""The routing information base: every path received, the chosen ones, the reasons. Pure.

Per peer we keep everything it sent (Adj-RIB-In) with the policy verdict, so a change
in etcd (a block claimed, a pool enabled) re-evaluates what is already here instead
of waiting for the peer to send it again. The best path for a prefix is the one with
the shortest AS path, then the lowest peer address; with ECMP on, every accepted
path as short as the best is used.

Graceful restart: when a peer that advertised it drops the session without a
NOTIFICATION, its paths are marked stale and stay usable; once it is back, the paths
it re-announces become fresh again and End-of-RIB (or the restart timer) removes the
rest.

Methods return the prefixes whose selection may have changed, so the caller updates
the kernel incrementally.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from fabric.model.prefix import Prefix


@dataclass(frozen=True)
class Path:
    peer: str
    next_hop: str
    as_path: tuple[int, ...] = ()
    rejected: str | None = None  # policy verdict: None means accepted
    stale: bool = False

    @property
    def accepted(self) -> bool:
        return self.rejected is None


def _peer_key(peer: str) -> tuple[int, int]:
    address = ipaddress.ip_address(peer)
    return address.version, int(address)


@dataclass
class Rib:
    ecmp: bool = False
    paths: dict[Prefix, dict[str, Path]] = field(default_factory=dict)
    by_peer: dict[str, set[Prefix]] = field(default_factory=dict)
    selected: dict[Prefix, tuple[Path, ...]] = field(default_factory=dict)

    # -- input -------------------------------------------------------------------------
    def announce(self, peer: str, prefix: Prefix, path: Path) -> bool:
        """Store a received path; True when the selection for `prefix` changed."""
        self.paths.setdefault(prefix, {})[peer] = path
        self.by_peer.setdefault(peer, set()).add(prefix)
        return self._select(prefix)

    def withdraw(self, peer: str, prefix: Prefix) -> bool:
        by_prefix = self.paths.get(prefix)
        if not by_prefix or by_prefix.pop(peer, None) is None:
            return False
        if not by_prefix:
            del self.paths[prefix]
        self.by_peer.get(peer, set()).discard(prefix)
        return self._select(prefix)

    def drop_peer(self, peer: str) -> set[Prefix]:
        """Forget every path of a peer (session down without graceful restart)."""
        changed = set()
        for prefix in list(self.by_peer.pop(peer, ())):
            by_prefix = self.paths.get(prefix, {})
            by_prefix.pop(peer, None)
            if not by_prefix:
                self.paths.pop(prefix, None)
            if self._select(prefix):
                changed.add(prefix)
        return changed

    def mark_stale(self, peer: str) -> set[Prefix]:
        """Graceful restart began: keep the peer's paths, but as stale.

        Returns the prefixes whose selection now holds a stale path (same next hops,
        so the kernel does not change; but what is shown as best must be the stale one).
        """
        changed = set()
        for prefix in self.by_peer.get(peer, ()):
            path = self.paths[prefix][peer]
            if not path.stale:
                self.paths[prefix][peer] = replace(path, stale=True)
                if self._select(prefix):
                    changed.add(prefix)
        return changed

    def sweep_stale(self, peer: str) -> set[Prefix]:
        """End-of-RIB (or the restart timer): drop what the peer did not send again."""
        changed = set()
        for prefix in [p for p in self.by_peer.get(peer, ()) if self.paths[p][peer].stale]:
            if self.withdraw(peer, prefix):
                changed.add(prefix)
        return changed

    def reevaluate(self, judge: Callable[[Prefix, Path], str | None],
                   prefixes: Iterable[Prefix] | None = None) -> set[Prefix]:
        """Apply the policy again (all paths, or those of some prefixes)."""
        changed = set()
        for prefix in list(self.paths if prefixes is None else prefixes):
            by_prefix = self.paths.get(prefix)
            if not by_prefix:
                continue
            for peer, path in list(by_prefix.items()):
                verdict = judge(prefix, path)
                if verdict != path.rejected:
                    by_prefix[peer] = replace(path, rejected=verdict)
            if self._select(prefix):
                changed.add(prefix)
        return changed

    # -- selection ---------------------------------------------------------------------
    def _select(self, prefix: Prefix) -> bool:
        candidates = [p for p in self.paths.get(prefix, {}).values() if p.accepted]
        if not candidates:
            return self.selected.pop(prefix, None) is not None
        if len(candidates) == 1:
            new: tuple[Path, ...] = (candidates[0],)
        else:
            candidates.sort(key=lambda p: (len(p.as_path), _peer_key(p.peer)))
            best = candidates[0]
            chosen = [best]
            if self.ecmp:
                chosen = [p for p in candidates if len(p.as_path) == len(best.as_path)]
            new = tuple(chosen)
        if self.selected.get(prefix) == new:
            return False
        self.selected[prefix] = new
        return True

    # -- reading -----------------------------------------------------------------------
    def next_hops(self, prefix: Prefix) -> tuple[str, ...]:
        return tuple(sorted({p.next_hop for p in self.selected.get(prefix, ())}))

    def received(self, peer: str | None = None) -> list[tuple[Prefix, Path]]:
        peers = [peer] if peer is not None else list(self.by_peer)
        return sorted(((prefix, self.paths[prefix][p]) for p in peers
                       for prefix in self.by_peer.get(p, ())),
                      key=lambda item: (item[0], item[1].peer))

    def counts(self, peer: str) -> dict[str, int]:
        verdicts = Counter(self.paths[p][peer].accepted for p in self.by_peer.get(peer, ()))
        return {"received": verdicts[True] + verdicts[False], "accepted": verdicts[True],
                "rejected": verdicts[False]}
