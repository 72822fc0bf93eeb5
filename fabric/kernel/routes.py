"""What the kernel should hold: the route model and the pure diff.

The agent owns every route in the main table that carries its protocol number and
nothing else. A route is identified by its destination prefix; its value is what the
kernel can tell us back (type, next hops, output interface), so "desired" and
"actual" compare without any hidden state. `kind` is ours alone: it says why a route
exists (remote block, local workload, blackhole, borrowed /32) and is shown to people,
but it is not part of what the kernel is compared on.

Prefixes are `fabric.model.prefix.Prefix` (integers, cheap at 100,000 routes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from fabric.model.prefix import Prefix

DEFAULT_PROTOCOL = 73  # l3fabric's route protocol number ("proto 73" in `ip route`)

Kind = Literal["remote", "workload", "blackhole", "borrowed"]
RouteType = Literal["unicast", "blackhole"]


@dataclass(frozen=True, slots=True)
class Route:
    """One route the agent wants in (or found in) the kernel's main table."""

    prefix: Prefix
    type: RouteType = "unicast"
    gateways: tuple[str, ...] = ()  # sorted; more than one is ECMP
    oif: int = 0  # output interface index; 0 lets the kernel pick (via a gateway)
    kind: Kind = field(default="remote", compare=False)

    def describe(self) -> str:
        if self.type == "blackhole":
            return f"blackhole {self.prefix}"
        via = " ".join(f"via {g}" for g in self.gateways)
        dev = f" dev#{self.oif}" if self.oif and not self.gateways else ""
        return f"{self.prefix} {via}{dev}".strip()


def remote(prefix: Prefix, gateways: Iterable[str], kind: Kind = "remote") -> Route:
    return Route(prefix, "unicast", tuple(sorted(set(gateways))), 0, kind)


def blackhole(prefix: Prefix) -> Route:
    return Route(prefix, "blackhole", (), 0, "blackhole")


def workload(prefix: Prefix, oif: int) -> Route:
    return Route(prefix, "unicast", (), oif, "workload")


@dataclass(frozen=True)
class Diff:
    """What to change so the kernel matches: routes to (re)place and prefixes to drop."""

    replace: list[Route]
    delete: list[Route]

    def __bool__(self) -> bool:
        return bool(self.replace or self.delete)


def diff(desired: Mapping[Prefix, Route], actual: Mapping[Prefix, Route],
         keep: Iterable[Prefix] = ()) -> Diff:
    """Routes that are missing or differ, and owned routes nobody wants any more.

    `keep` lists actual prefixes that must not be deleted even though they are not
    desired (routes taken over after a restart, still waiting for their peers).
    """
    replace = [r for p, r in desired.items() if actual.get(p) != r]
    kept = set(keep)
    delete = [r for p, r in actual.items() if p not in desired and p not in kept]
    return Diff(replace, delete)


def kind_of(route: Route) -> Kind:
    """Why a route found in the kernel exists, as far as the kernel can tell (display)."""
    if route.type == "blackhole":
        return "blackhole"
    if route.oif and not route.gateways:
        return "workload"
    return "borrowed" if route.prefix.length == route.prefix.bits else "remote"


# -- what the kernel writer reports (fabric.kernel.writer) -------------------------------
@dataclass(frozen=True)
class Failure:
    route: Route
    delete: bool
    error: int

    def __str__(self) -> str:
        verb = "delete" if self.delete else "install"
        return f"{verb} {self.route.describe()}: {os.strerror(self.error)}"


@dataclass(frozen=True)
class Drift:
    """A repair: what the kernel had that it should not have had, and when."""

    at: float
    prefix: str
    found: str  # "missing", or the route the kernel held instead
    wanted: str  # the route we want, or "nothing"

    def to_dict(self) -> dict[str, object]:
        return {"at": self.at, "prefix": self.prefix, "found": self.found,
                "wanted": self.wanted}


@dataclass(frozen=True)
class Applied:
    """A batch of changes went to the kernel; some may have been refused."""

    count: int
    failures: tuple[Failure, ...]
    seconds: float


@dataclass(frozen=True)
class Resynced:
    """The kernel was read back and repaired; `drift` is what someone else had done."""

    drift: tuple[Drift, ...]
    repaired: int
    failures: tuple[Failure, ...]
    seconds: float


@dataclass(frozen=True)
class RouteEvent:
    """Somebody else (not our writer) changed a route of our protocol."""

    deleted: bool
    route: Route


@dataclass(frozen=True)
class EventsLost:
    """The route event socket overflowed: some changes were not seen (resync)."""
