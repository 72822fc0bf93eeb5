"""What the kernel should hold, by source: the agent's desired routes. Pure.

Shaped like Calico Felix's route table: routes come from named sources (learned BGP
routes, blackholes for our own blocks, /32s to local workloads), and when two sources
want the same prefix the higher one wins: a local workload's /32 beats anything
learned, our own block's blackhole beats a learned copy of it.

Every change returns the *effective* changes (a route to install, or a prefix to
delete), in the order they were decided; the owner loop hands them to the kernel
writer in that order, so the kernel never sees two decisions reversed.

After a restart the agent takes over the routes of its protocol it finds in the
kernel (`take_over`): they are kept, though nothing wants them yet, until
`release_stale` says the peers that could confirm them have had their chance. A
taken-over prefix that becomes wanted is ours again and leaves the stale set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fabric.kernel.routes import Route
from fabric.model.prefix import Prefix

SOURCES = ("learned", "blackholes", "workloads")  # ascending priority


@dataclass(frozen=True)
class KernelBatch:
    """Changes for the kernel writer, in decision order: deletes, then replaces."""

    replace: tuple[Route, ...] = ()
    delete: tuple[Prefix, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.replace or self.delete)

    def __len__(self) -> int:
        return len(self.replace) + len(self.delete)


@dataclass
class DesiredRoutes:
    sources: dict[str, dict[Prefix, Route]] = field(
        default_factory=lambda: {name: {} for name in SOURCES})
    stale: set[Prefix] = field(default_factory=set)

    # -- reading -----------------------------------------------------------------------
    def wanted(self, prefix: Prefix) -> Route | None:
        for name in reversed(SOURCES):
            route = self.sources[name].get(prefix)
            if route is not None:
                return route
        return None

    def effective(self) -> dict[Prefix, Route]:
        merged: dict[Prefix, Route] = {}
        for name in SOURCES:  # ascending priority: later sources overwrite
            merged.update(self.sources[name])
        return merged

    def source(self, name: str) -> dict[Prefix, Route]:
        return self.sources[name]

    def kept(self) -> frozenset[Prefix]:
        """Taken-over prefixes nobody wants yet, kept in the kernel for now."""
        return frozenset(p for p in self.stale if self.wanted(p) is None)

    # -- changing ----------------------------------------------------------------------
    def update(self, source: str, changes: Mapping[Prefix, Route | None]) -> KernelBatch:
        """Set (or with None, drop) some of one source's routes."""
        if source == SOURCES[0]:
            return self._update_lowest(changes)
        routes = self.sources[source]
        before = {p: self.wanted(p) for p in changes}
        for prefix, route in changes.items():
            if route is None:
                routes.pop(prefix, None)
            else:
                routes[prefix] = route
        return self._batch(before)

    def _update_lowest(self, changes: Mapping[Prefix, Route | None]) -> KernelBatch:
        """`update` of the lowest source (learned routes: the bulk of them, 100,000 at a
        time): a prefix another source holds is left to it, the rest is compared once."""
        routes = self.sources[SOURCES[0]]
        blackholes, workloads = (self.sources[name] for name in SOURCES[1:])
        replace: list[Route] = []
        delete: list[Prefix] = []
        stale = self.stale
        for prefix, route in changes.items():
            old = routes.pop(prefix, None) if route is None else routes.get(prefix)
            if route is not None:
                routes[prefix] = route
            if prefix in blackholes or prefix in workloads:
                continue  # a workload or our own blackhole wins: the kernel keeps it
            if route is not None:
                if stale:
                    stale.discard(prefix)
                if old is None or route != old or route.kind != old.kind:
                    replace.append(route)
            elif old is not None and prefix not in stale:
                delete.append(prefix)
        return KernelBatch(tuple(replace), tuple(delete))

    def replace(self, source: str, routes: Mapping[Prefix, Route]) -> KernelBatch:
        """Make one source's routes exactly `routes`."""
        old = self.sources[source]
        changes: dict[Prefix, Route | None] = {p: None for p in old if p not in routes}
        changes.update({p: r for p, r in routes.items() if old.get(p) != r
                        or old[p].kind != r.kind})
        return self.update(source, changes) if changes else KernelBatch()

    def take_over(self, found: Iterable[Prefix]) -> None:
        self.stale = set(found)

    def release_stale(self) -> KernelBatch:
        """Stop protecting taken-over routes: those nobody wants now go."""
        doomed = tuple(sorted(self.kept()))
        self.stale = set()
        return KernelBatch(delete=doomed)

    def _batch(self, before: Mapping[Prefix, Route | None]) -> KernelBatch:
        replace: list[Route] = []
        delete: list[Prefix] = []
        for prefix, old in before.items():
            new = self.wanted(prefix)
            if new is not None:
                self.stale.discard(prefix)
                if new != old or old is None or new.kind != old.kind:
                    replace.append(new)
            elif old is not None and prefix not in self.stale:
                delete.append(prefix)
        return KernelBatch(tuple(replace), tuple(delete))
