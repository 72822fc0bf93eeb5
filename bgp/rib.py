"""The routing information base: every path received, the chosen ones, the reasons. Pure.

Per peer we keep everything it sent (Adj-RIB-In) with the policy verdict, so a change
in etcd (a block claimed, a pool enabled) re-evaluates what is already here instead
of waiting for the peer to send it again. The best path for a prefix is the one with
the shortest AS path, then (RFC 4271 9.1.2.2 with RFC 4456 9) the lowest BGP
identifier of its source (its ORIGINATOR_ID when reflected, else the peer's router
id), then the shortest CLUSTER_LIST, then the lowest peer address; with ECMP on, every
accepted path as short as the best is used.

Why the identifier and the cluster list matter: with two reflectors, each also hears
a client's route from the other reflector. Ranked by peer address alone, a reflector
could prefer its twin's copy, stop reflecting to that twin (never back to the
source), the twin then lose its own preferred copy and do the same: the two traded
the route back and forth forever, flooding every session (measured: 280 KB per
client per minute in a 6-host lab, and a dead host's hold timer never firing behind
the full send queue). The copy heard directly has the same originator and a shorter
cluster list, so it wins on both sides and the twins agree.

Graceful restart: when a peer that advertised it drops the session without a
NOTIFICATION, its paths are marked stale and stay usable; once it is back, the paths
it re-announces become fresh again and End-of-RIB (or the restart timer) removes the
rest.

Methods return the prefixes whose selection may have changed, so the caller updates
the kernel incrementally.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from fabric.model.prefix import Prefix


@dataclass(frozen=True, slots=True)
class Path:
    peer: str
    next_hop: str
    as_path: tuple[int, ...] = ()
    rejected: str | None = None  # policy verdict: None means accepted
    stale: bool = False
    originator: str = ""  # BGP identifier of the source: ORIGINATOR_ID, or the peer's
    cluster_list: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.rejected is None


@functools.lru_cache(maxsize=4096)
def _peer_key(peer: str) -> tuple[int, int]:
    address = ipaddress.ip_address(peer)
    return address.version, int(address)


@functools.lru_cache(maxsize=4096)
def _id_key(identifier: str) -> int:
    try:
        return int(ipaddress.IPv4Address(identifier))
    except ValueError:
        return 0  # unknown (no OPEN seen yet): ranks first, then by the other rules


def rank(path: Path) -> tuple[int, int, int, tuple[int, int]]:
    """Smaller is better: AS path length, source identifier, cluster list, peer."""
    return (len(path.as_path), _id_key(path.originator), len(path.cluster_list),
            _peer_key(path.peer))


class Rib:
    """Paths by prefix and peer, and the selection.

    Storage is compact because a fabric node may hold 100,000 received routes: a prefix
    with one path (nearly all) keeps that path itself rather than a dict of one, and a
    selection of one keeps the path rather than a tuple of one. Nothing outside this
    class sees that: read through `paths_of`, `best` and `selected_prefixes`.
    """

    def __init__(self, ecmp: bool = False) -> None:
        self.ecmp = ecmp
        self._paths: dict[Prefix, Path | dict[str, Path]] = {}
        self.by_peer: dict[str, set[Prefix]] = {}
        self._best: dict[Prefix, Path | tuple[Path, ...]] = {}

    # -- reading -----------------------------------------------------------------------
    def paths_of(self, prefix: Prefix) -> dict[str, Path]:
        held = self._paths.get(prefix)
        if held is None:
            return {}
        return {held.peer: held} if isinstance(held, Path) else dict(held)

    def path(self, prefix: Prefix, peer: str) -> Path | None:
        held = self._paths.get(prefix)
        if isinstance(held, Path):
            return held if held.peer == peer else None
        return held.get(peer) if held is not None else None

    def best(self, prefix: Prefix) -> tuple[Path, ...]:
        chosen = self._best.get(prefix)
        if chosen is None:
            return ()
        return (chosen,) if isinstance(chosen, Path) else chosen

    def selected_prefixes(self) -> Iterable[Prefix]:
        return self._best.keys()

    def __len__(self) -> int:
        return len(self._paths)

    # -- input -------------------------------------------------------------------------
    def announce(self, peer: str, prefix: Prefix, path: Path) -> bool:
        """Store a received path; True when the selection for `prefix` changed."""
        self._put(prefix, peer, path)
        peers = self.by_peer.get(peer)
        if peers is None:
            peers = self.by_peer[peer] = set()
        peers.add(prefix)
        return self._select(prefix)

    def withdraw(self, peer: str, prefix: Prefix) -> bool:
        if not self._pop(prefix, peer):
            return False
        self.by_peer.get(peer, set()).discard(prefix)
        return self._select(prefix)

    def drop_peer(self, peer: str) -> set[Prefix]:
        """Forget every path of a peer (session down without graceful restart)."""
        changed = set()
        for prefix in list(self.by_peer.pop(peer, ())):
            self._pop(prefix, peer)
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
            path = self.path(prefix, peer)
            if path is not None and not path.stale:
                self._put(prefix, peer, replace(path, stale=True))
                if self._select(prefix):
                    changed.add(prefix)
        return changed

    def sweep_stale(self, peer: str) -> set[Prefix]:
        """End-of-RIB (or the restart timer): drop what the peer did not send again."""
        changed = set()
        stale = [p for p in self.by_peer.get(peer, ())
                 if (path := self.path(p, peer)) is not None and path.stale]
        for prefix in stale:
            if self.withdraw(peer, prefix):
                changed.add(prefix)
        return changed

    def reevaluate(self, judge: Callable[[Prefix, Path], str | None],
                   prefixes: Iterable[Prefix] | None = None) -> set[Prefix]:
        """Apply the policy again (all paths, or those of some prefixes)."""
        changed = set()
        for prefix in list(self._paths if prefixes is None else prefixes):
            for peer, path in self.paths_of(prefix).items():
                verdict = judge(prefix, path)
                if verdict != path.rejected:
                    self._put(prefix, peer, replace(path, rejected=verdict))
            if self._select(prefix):
                changed.add(prefix)
        return changed

    # -- storage -----------------------------------------------------------------------
    def _put(self, prefix: Prefix, peer: str, path: Path) -> None:
        held = self._paths.get(prefix)
        if held is None or (isinstance(held, Path) and held.peer == peer):
            self._paths[prefix] = path
        elif isinstance(held, Path):
            self._paths[prefix] = {held.peer: held, peer: path}
        else:
            held[peer] = path

    def _pop(self, prefix: Prefix, peer: str) -> bool:
        held = self._paths.get(prefix)
        if held is None:
            return False
        if isinstance(held, Path):
            if held.peer != peer:
                return False
            del self._paths[prefix]
            return True
        if held.pop(peer, None) is None:
            return False
        if len(held) == 1:
            self._paths[prefix] = next(iter(held.values()))
        return True

    # -- selection ---------------------------------------------------------------------
    def _select(self, prefix: Prefix) -> bool:
        held = self._paths.get(prefix)
        if held is None:
            return self._best.pop(prefix, None) is not None
        new: Path | tuple[Path, ...]
        if isinstance(held, Path):
            if held.rejected is not None:
                return self._best.pop(prefix, None) is not None
            new = held
        else:
            candidates = [p for p in held.values() if p.rejected is None]
            if not candidates:
                return self._best.pop(prefix, None) is not None
            if len(candidates) == 1:
                new = candidates[0]
            else:
                candidates.sort(key=rank)
                best = candidates[0]
                chosen = [best]
                if self.ecmp:
                    chosen = [p for p in candidates if len(p.as_path) == len(best.as_path)]
                new = tuple(chosen) if len(chosen) > 1 else best
        old = self._best.get(prefix)
        if old is new or old == new:
            return False
        self._best[prefix] = new
        return True

    # -- reading (continued) -----------------------------------------------------------
    def next_hops(self, prefix: Prefix) -> tuple[str, ...]:
        chosen = self._best.get(prefix)
        if chosen is None:
            return ()
        if isinstance(chosen, Path):  # the common case, and the hot one at 100,000 routes
            return (chosen.next_hop,)
        return tuple(sorted({p.next_hop for p in chosen}))

    def received(self, peer: str | None = None) -> list[tuple[Prefix, Path]]:
        peers = [peer] if peer is not None else list(self.by_peer)
        found = [(prefix, path) for p in peers for prefix in self.by_peer.get(p, ())
                 if (path := self.path(prefix, p)) is not None]
        return sorted(found, key=lambda item: (item[0], item[1].peer))

    def counts(self, peer: str) -> dict[str, int]:
        verdicts = Counter(path.accepted for p in self.by_peer.get(peer, ())
                           if (path := self.path(p, peer)) is not None)
        return {"received": verdicts[True] + verdicts[False], "accepted": verdicts[True],
                "rejected": verdicts[False]}
