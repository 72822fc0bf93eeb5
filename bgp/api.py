"""ExaBGP's API, sans I/O: JSON lines in, typed events out; commands as text.

ExaBGP (with `encoder json` and `receive { parsed; update; open; notification; }`
plus `neighbor-changes`) writes one JSON object per line to its API process, and
answers each command we write with `done` or `error`. `parse_line` turns a line into
the events below; nothing here reads or writes a pipe, so it is tested with recorded
lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Ack:
    ok: bool


@dataclass(frozen=True)
class PeerState:
    peer: str
    state: str  # connected, up, down
    reason: str = ""


@dataclass(frozen=True)
class Open:
    peer: str
    graceful_restart: int | None  # the peer's restart time when it advertises GR
    hold_time: int
    router_id: str


@dataclass(frozen=True)
class Notification:
    peer: str
    code: int
    subcode: int
    received: bool


@dataclass(frozen=True)
class Attributes:
    as_path: tuple[int, ...] = ()
    local_pref: int | None = None
    med: int | None = None
    origin: str = ""
    originator_id: str = ""  # RFC 4456: set by the first reflector, the route's source
    cluster_list: tuple[str, ...] = ()  # RFC 4456: the reflectors it went through


@dataclass(frozen=True)
class Update:
    """One UPDATE: announced prefixes grouped by next hop, and withdrawn prefixes."""

    peer: str
    announced: dict[str, list[str]] = field(default_factory=dict)  # next hop -> prefixes
    withdrawn: list[str] = field(default_factory=list)
    attributes: Attributes = field(default_factory=Attributes)


@dataclass(frozen=True)
class EndOfRib:
    peer: str
    family: str  # "ipv4 unicast"


@dataclass(frozen=True)
class Unknown:
    line: str


Event = Ack | PeerState | Open | Notification | Update | EndOfRib | Unknown


def parse_line(line: str | bytes) -> Iterator[Event]:
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text:
        return
    if text in ("done", "error"):
        yield Ack(text == "done")
        return
    try:
        doc = json.loads(text)
    except ValueError:
        yield Unknown(text)
        return
    if not isinstance(doc, dict):
        yield Unknown(text)
        return
    kind = doc.get("type")
    neighbor = doc.get("neighbor") or {}
    peer = str((neighbor.get("address") or {}).get("peer", ""))
    if kind == "state":
        yield PeerState(peer, str(neighbor.get("state", "")), str(neighbor.get("reason", "")))
    elif kind == "open":
        yield _open(peer, neighbor.get("open") or {})
    elif kind == "notification":
        note = neighbor.get("notification") or {}
        yield Notification(peer, int(note.get("code", 0)), int(note.get("subcode", 0)),
                           neighbor.get("direction") == "receive")
    elif kind == "update":
        message = neighbor.get("message") or {}
        if "eor" in message:
            eor = message["eor"]
            yield EndOfRib(peer, f"{eor.get('afi', '')} {eor.get('safi', '')}")
            return
        yield _update(peer, message.get("update") or {})
    else:
        yield Unknown(text)


def _open(peer: str, body: dict[str, Any]) -> Open:
    restart = None
    for capability in (body.get("capabilities") or {}).values():
        if isinstance(capability, dict) and capability.get("name") == "graceful restart":
            restart = int(capability.get("time", 0))
    return Open(peer, restart, int(body.get("hold_time", 0)), str(body.get("router_id", "")))


def as_path_of(value: Any) -> tuple[int, ...]:
    """ExaBGP 5 nests segments (`{"0": {"element": "as-sequence", "value": [...]}}`);
    older encoders give a flat list. AS sets count as their members."""
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(a) for a in value)
    if isinstance(value, dict):
        path: list[int] = []
        for key in sorted(value, key=lambda k: int(k) if str(k).isdigit() else 0):
            segment = value[key]
            members = segment.get("value", []) if isinstance(segment, dict) else segment
            path.extend(int(a) for a in members)
        return tuple(path)
    return ()


def _update(peer: str, body: dict[str, Any]) -> Update:
    attrs = body.get("attribute") or {}
    clusters = attrs.get("cluster-list")
    attributes = Attributes(as_path_of(attrs.get("as-path")), attrs.get("local-preference"),
                            attrs.get("med"), str(attrs.get("origin", "")),
                            str(attrs.get("originator-id") or ""),
                            tuple(str(c) for c in clusters) if isinstance(clusters, list)
                            else ())
    announced: dict[str, list[str]] = {}
    for family, by_hop in (body.get("announce") or {}).items():
        if not family.endswith("unicast") or not isinstance(by_hop, dict):
            continue
        found: dict[str, list[str]] = {}
        for next_hop, nlris in by_hop.items():
            found[next_hop] = [n["nlri"] if isinstance(n, dict) else str(n) for n in nlris]
        for next_hop, nlris in _global_next_hops(found).items():
            announced.setdefault(next_hop, []).extend(nlris)
    withdrawn: list[str] = []
    for family, nlris in (body.get("withdraw") or {}).items():
        if family.endswith("unicast"):
            withdrawn.extend(n["nlri"] if isinstance(n, dict) else str(n) for n in nlris)
    return Update(peer, announced, withdrawn, attributes)


def _global_next_hops(by_hop: dict[str, list[str]]) -> dict[str, list[str]]:
    """An IPv6 route can carry a global and a link-local next hop (RFC 2545; BIRD sends
    both over eBGP on a shared link), which ExaBGP reports as the same prefix under two
    next hops. The global one is what the kernel can use without knowing the link: a
    prefix that also came with a global next hop is kept only under it."""
    link_local = [h for h in by_hop if h.lower().startswith("fe80:")]
    if not link_local or len(link_local) == len(by_hop):
        return by_hop
    covered = {n for h, nlris in by_hop.items() if h not in link_local for n in nlris}
    out = {h: nlris for h, nlris in by_hop.items() if h not in link_local}
    for hop in link_local:
        rest = [n for n in by_hop[hop] if n not in covered]
        if rest:
            out[hop] = rest
    return out


# -- commands ----------------------------------------------------------------------------
# One command a line; ExaBGP answers each with `done` or `error`. Our own routes go to
# every neighbor with next hop self; batches keep the command count (ExaBGP parses each
# line in Python) low: 100,000 prefixes are 100 lines, not 100,000.
BATCH = 1000


@dataclass(frozen=True)
class Reflected:
    """A route reflected to a neighbor: the original next hop and path, plus RR marks
    (the originator, and the cluster list with ours first)."""

    prefix: str
    next_hop: str
    as_path: tuple[int, ...]
    originator_id: str
    cluster_list: tuple[str, ...]


def _target(peer: str | None) -> str:
    return f"neighbor {peer} " if peer else ""


def announce_self(prefixes: Iterable[str], peer: str | None = None) -> list[str]:
    """Announce our own routes (to every neighbor, or to one)."""
    return [f"{_target(peer)}announce attributes next-hop self nlri {' '.join(chunk)}"
            for chunk in _family_chunks(prefixes)]


def withdraw(prefixes: Iterable[str], peer: str | None = None) -> list[str]:
    """Withdraw routes, ours or reflected (to every neighbor, or to one). A withdraw
    carries prefixes only; ExaBGP's syntax wants a next hop all the same."""
    return [f"{_target(peer)}withdraw attributes next-hop self nlri {' '.join(chunk)}"
            for chunk in _family_chunks(prefixes)]


def _family_chunks(prefixes: Iterable[str]) -> Iterator[list[str]]:
    """One family per line: ExaBGP 5.0.15 acts on one family of a line that mixes
    IPv4 and IPv6 prefixes (a dual-stack node's withdrawal of both of its blocks
    reached its IPv6 peers only; the IPv4 ones kept the route, stale)."""
    ordered = sorted(prefixes)
    for family in ([p for p in ordered if ":" not in p], [p for p in ordered if ":" in p]):
        yield from _chunks(family)


def announce_reflected(peer: str, routes: Iterable[Reflected]) -> list[str]:
    """Reflect routes to one neighbor: those with the same attributes in one command
    (up to BATCH prefixes), as ExaBGP packs them into one UPDATE. One command per
    route cost ExaBGP a parse and an UPDATE each: a reflector passing on a client's
    big table managed about 60 routes a second and grew to about 1 GB."""
    groups: dict[tuple[str, tuple[int, ...], str, tuple[str, ...]], list[str]] = {}
    for route in routes:
        key = (route.next_hop, route.as_path, route.originator_id, route.cluster_list)
        groups.setdefault(key, []).append(route.prefix)
    commands = []
    for (next_hop, as_path, originator, clusters), prefixes in sorted(groups.items()):
        path = f" as-path [ {' '.join(map(str, as_path))} ]" if as_path else ""
        head = (f"neighbor {peer} announce attributes next-hop {next_hop}{path} "
                f"originator-id {originator} cluster-list [ {' '.join(clusters)} ] nlri")
        commands += [f"{head} {' '.join(chunk)}" for chunk in _chunks(sorted(prefixes))]
    return commands


def teardown(peer: str, subcode: int = 2) -> str:
    """Close one session with a Cease notification (2: administrative shutdown)."""
    return f"neighbor {peer} teardown {subcode}"


RELOAD = "reload"  # re-read the configuration file (only sent once the API is up)


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), BATCH):
        yield items[start:start + BATCH]
