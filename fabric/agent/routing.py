"""The routing controller: etcd state and BGP events in, ExaBGP config and kernel routes out.

It glues the pure parts together: `bgp.peers` decides the neighbors, `bgp.config`
renders what ExaBGP announces, `bgp.policy` judges what peers send, `bgp.rib`
chooses, and the kernel reconciler installs. Inputs arrive on several threads (etcd
watches, the ExaBGP reader, a timer), so every entry point takes one lock; the work
done under it is in-memory, while kernel writes and ExaBGP reloads happen outside.

Session loss: a NOTIFICATION (hold timer expired, Cease from a peer shutting down)
removes the peer's routes at once. A session that just drops (the peer's speaker was
killed; the TCP connection closed without a word) is treated as a graceful restart
when the peer advertised it: its routes stay, marked stale, until it is back and sends
End-of-RIB, or its restart time runs out, or it leaves etcd.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bgp import api, policy
from bgp.config import Reflected, SpeakerSettings, render
from bgp.peers import Peer, peers_for
from bgp.rib import Path, Rib
from fabric import logs
from fabric.kernel.reconciler import Reconciler
from fabric.kernel.routes import Kind, Route, blackhole, remote
from fabric.model.blocks import Block
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import Pool
from fabric.model.prefix import Prefix
from fabric.store import keys

MAX_PREFIX_HOLD_DOWN = 60.0
REJECTIONS_LOGGED = 10  # per peer and reason; beyond that they are counted only
STATE_NAMES = {"connected": "OpenSent", "up": "Established", "down": "Active"}


@dataclass
class Session:
    peer: Peer
    state: str = "Idle"
    since: float = field(default_factory=time.time)
    last_error: str = ""
    restart_time: int | None = None  # the peer's graceful-restart time, from its OPEN
    router_id: str = ""
    eor: bool = False
    stale_until: float | None = None
    held_down_until: float | None = None
    rejected: Counter[str] = field(default_factory=Counter)  # cumulative, by reason
    flaps: int = 0


@dataclass(frozen=True)
class FabricState:
    """What etcd says, as the mirrors last saw it."""

    nodes: tuple[Node, ...] = ()
    pools: tuple[Pool, ...] = ()
    blocks: tuple[Block, ...] = ()
    borrowed: Mapping[str, str] = field(default_factory=dict)  # address -> node
    config: BgpConfig = field(default_factory=BgpConfig)
    specs: tuple[PeerSpec, ...] = ()


class RoutingController:
    def __init__(self, me: Node, reconciler: Reconciler, *, hold_time: int,
                 graceful_restart: int, ecmp: bool, max_prefixes: int,
                 fixed_asn: int | None) -> None:
        self.me = me
        self.fixed_asn = fixed_asn
        self.reconciler = reconciler
        self.hold_time = hold_time
        self.graceful_restart = graceful_restart
        self.default_max_prefixes = max_prefixes
        self.log = logs.get("routing", node=me.name)
        self.rib = Rib(ecmp=ecmp)
        self.state = FabricState()
        self.sessions: dict[str, Session] = {}
        self.peers: dict[str, Peer] = {}
        self.exports: set[str] = set()
        self.ctx = policy.PolicyContext(local_as=me.asn)
        self.started_at = time.time()
        self.stale_released = False
        self.speaker: Any = None  # bgp.speaker.Speaker, set by the agent
        self.relay_command: list[str] = []
        self.on_asn_change: Callable[[Node], None] | None = None
        self._lock = threading.RLock()
        self._render_due = threading.Event()
        self.updates_received = 0
        self.prefixes_processed = 0

    # -- etcd input --------------------------------------------------------------------
    def set_state(self, **changes: Any) -> None:
        """A mirror changed: recompute peers, exports, policy, and what follows."""
        with self._lock:
            old = self.state
            self.state = FabricState(**{**old.__dict__, **changes})
            asn = self.fixed_asn or self.state.config.asn
            if asn != self.me.asn:
                self.me = Node(**{**self.me.__dict__, "asn": asn})
                self.log.info("local AS changed", asn=asn)
                if self.on_asn_change:
                    self.on_asn_change(self.me)
            self._refresh_peers()
            self._refresh_exports()
            kernel = self._refresh_policy(old)
        if kernel:
            self.reconciler.update("learned", kernel)
        self._render_due.set()

    def _refresh_peers(self) -> None:
        nodes = [n for n in self.state.nodes if n.name != self.me.name]
        wanted = peers_for(self.me, [self.me, *nodes], self.state.specs, self.state.config)
        for address in set(self.peers) - set(wanted):
            self.log.info("peer removed", peer=address)
            self.sessions.pop(address, None)
            self._apply_kernel(self.rib.drop_peer(address))
        for address, peer in wanted.items():
            session = self.sessions.get(address)
            if session is None:
                self.log.info("peer added", peer=address, kind=peer.kind, asn=peer.asn)
                self.sessions[address] = Session(peer)
            else:
                session.peer = peer
        self.peers = wanted

    def _refresh_exports(self) -> None:
        own = {b.cidr for b in self.state.blocks if b.affinity == self.me.name}
        borrowed = {f"{a}/{128 if ':' in a else 32}" for a, n in self.state.borrowed.items()
                    if n == self.me.name}
        self.exports = own | borrowed
        self.reconciler.replace("blackholes", {p: blackhole(p) for p in map(Prefix.parse, own)})

    def _refresh_policy(self, old: FabricState) -> dict[Prefix, Route | None]:
        nodes = {n.name: n for n in self.state.nodes}
        nodes[self.me.name] = self.me

        def origin(node_name: str | None) -> policy.Origin | None:
            node = nodes.get(node_name or "")
            return policy.Origin(node.name, node.address, node.asn) if node else None

        blocks = {b.cidr: o for b in self.state.blocks if b.affinity
                  for o in [origin(b.affinity)] if o is not None}
        borrowed = {f"{a}/{128 if ':' in a else 32}": o for a, n in self.state.borrowed.items()
                    for o in [origin(n)] if o is not None}
        underlay = {n.address for n in nodes.values()} | set(self.peers)
        ctx = policy.PolicyContext.build(
            self.me.asn, [(p.cidr, p.block_size) for p in self.state.pools if not p.disabled],
            [b.cidr for b in self.state.blocks if b.affinity == self.me.name],
            underlay, blocks, borrowed)
        if ctx == self.ctx:
            return {}
        self.ctx = ctx
        changed = self.rib.reevaluate(self._judge)
        return self._kernel_changes(changed)

    def _judge(self, prefix: Prefix, path: Path) -> str | None:
        if path.rejected == policy.MAX_PREFIX:
            return path.rejected
        return policy.evaluate(prefix, path.next_hop, path.as_path, self.ctx)

    # -- ExaBGP configuration ----------------------------------------------------------
    def speaker_settings(self) -> SpeakerSettings:
        return SpeakerSettings(self.me.address, self.me.asn, self.hold_time,
                               self.graceful_restart, self.relay_command)

    def render(self) -> str:
        with self._lock:
            now = time.time()
            active = {a: p for a, p in self.peers.items()
                      if not (self.sessions[a].held_down_until or 0) > now}
            return render(self.speaker_settings(), active, self.exports, self._reflected())

    def _reflected(self) -> dict[str, list[Reflected]]:
        """Routes this node reflects, per neighbor (only when it is a route reflector)."""
        cluster = self.me.rr_cluster_id
        if not cluster:
            return {}
        out: dict[str, list[Reflected]] = {}
        ibgp = {a: p for a, p in self.peers.items() if p.asn == self.me.asn
                and p.kind in ("rr-client", "reflector")}
        for prefix, paths in self.rib.selected.items():
            best = paths[0]
            source = ibgp.get(best.peer)
            if source is None:
                continue
            originator = self.sessions[best.peer].router_id or best.peer
            for address, peer in ibgp.items():
                if address == best.peer or best.next_hop == address:
                    continue
                if source.kind == "rr-client" or peer.kind == "rr-client":
                    out.setdefault(address, []).append(Reflected(
                        str(prefix), best.next_hop, best.as_path, originator, cluster))
        return out

    def take_render(self, timeout: float) -> bool:
        """Wait until the configuration may have changed (for the agent's render loop)."""
        due = self._render_due.wait(timeout)
        self._render_due.clear()
        return due

    def static_plan(self) -> dict[str, set[str]]:
        """What each neighbor's static section holds (to withdraw what leaves it)."""
        with self._lock:
            reflected = self._reflected()
            return {peer: set(self.exports) | {r.prefix for r in reflected.get(peer, ())}
                    for peer in self.peers}

    # -- ExaBGP events -----------------------------------------------------------------
    def on_event(self, event: api.Event) -> None:
        kernel: dict[Prefix, Route | None] = {}
        with self._lock:
            if isinstance(event, api.Update):
                kernel = self._on_update(event)
            elif isinstance(event, api.PeerState):
                kernel = self._on_state(event)
            elif isinstance(event, api.Open):
                session = self.sessions.get(event.peer)
                if session:
                    session.restart_time = event.graceful_restart
                    session.router_id = event.router_id
            elif isinstance(event, api.Notification):
                session = self.sessions.get(event.peer)
                if session:
                    side = "received" if event.received else "sent"
                    session.last_error = (f"notification {side} ({event.code},{event.subcode})"
                                          f" {_notification_text(event.code, event.subcode)}")
            elif isinstance(event, api.EndOfRib):
                kernel = self._on_eor(event)
        if kernel:
            self.reconciler.update("learned", kernel)
            if self.me.rr_cluster_id:
                self._render_due.set()

    def _on_update(self, update: api.Update) -> dict[Prefix, Route | None]:
        session = self.sessions.get(update.peer)
        if session is None or session.held_down_until:
            return {}
        self.updates_received += 1
        peer = update.peer
        changed: set[Prefix] = set()
        for text in update.withdrawn:
            try:
                prefix = Prefix.parse(text)
            except ValueError:
                continue
            if self.rib.withdraw(peer, prefix):
                changed.add(prefix)
        limit = session.peer.max_prefixes or self.default_max_prefixes
        incoming = sum(len(v) for v in update.announced.values())
        have = len(self.rib.by_peer.get(peer, ()))
        if have + incoming > limit and incoming:
            return self._trip_max_prefix(session, limit, have + incoming, changed)
        as_path = update.attributes.as_path
        for next_hop, prefixes in update.announced.items():
            for text in prefixes:
                self.prefixes_processed += 1
                try:
                    prefix = Prefix.parse(text)
                except ValueError:
                    session.rejected[policy.BAD_PREFIX] += 1
                    continue
                verdict = policy.evaluate(prefix, next_hop, as_path, self.ctx)
                if verdict is not None:
                    session.rejected[verdict] += 1
                    if session.rejected[verdict] <= REJECTIONS_LOGGED:
                        self.log.info("route rejected", peer=peer, prefix=text,
                                      next_hop=next_hop, reason=verdict,
                                      **({"more": "further rejections for this reason are "
                                                  "only counted"}
                                         if session.rejected[verdict] == REJECTIONS_LOGGED
                                         else {}))
                if self.rib.announce(peer, prefix, Path(peer, next_hop, as_path, verdict)):
                    changed.add(prefix)
        return self._kernel_changes(changed)

    def _trip_max_prefix(self, session: Session, limit: int, count: int,
                         changed: set[Prefix]) -> dict[Prefix, Route | None]:
        peer = session.peer.address
        session.rejected[policy.MAX_PREFIX] += count - len(self.rib.by_peer.get(peer, ()))
        session.last_error = f"max-prefix {limit} exceeded ({count} received); " \
                             f"held down for {MAX_PREFIX_HOLD_DOWN:.0f}s"
        session.held_down_until = time.time() + MAX_PREFIX_HOLD_DOWN
        session.state = "Idle"
        session.since = time.time()
        self.log.warning("max-prefix exceeded; closing session", peer=peer, limit=limit,
                         received=count)
        changed |= self.rib.drop_peer(peer)
        if self.speaker is not None:
            self.speaker.send(api.teardown(peer, 1))  # Cease: maximum prefixes reached
        self._render_due.set()  # the peer leaves ExaBGP's config while held down
        return self._kernel_changes(changed)

    def _on_state(self, event: api.PeerState) -> dict[Prefix, Route | None]:
        session = self.sessions.get(event.peer)
        if session is None:
            return {}
        state = STATE_NAMES.get(event.state, event.state)
        if state == session.state:
            return {}
        was_up = session.state == "Established"
        session.state, session.since = state, time.time()
        log = self.log.bind(peer=event.peer)
        if state == "Established":
            session.eor = False
            log.info("session established")
            return {}
        if not was_up or event.state != "down":
            return {}
        session.flaps += 1
        reason = event.reason or "closed"
        session.last_error = _describe_reason(reason)
        graceful = session.restart_time and "notification" not in reason
        if graceful:
            assert session.restart_time is not None
            marked = self.rib.mark_stale(event.peer)
            session.stale_until = time.time() + session.restart_time
            log.info("session lost without notification; keeping its routes as stale",
                     routes=marked, restart_time=session.restart_time)
            return {}
        log.info("session down; withdrawing its routes", reason=reason)
        return self._kernel_changes(self.rib.drop_peer(event.peer))

    def _on_eor(self, event: api.EndOfRib) -> dict[Prefix, Route | None]:
        session = self.sessions.get(event.peer)
        if session is None:
            return {}
        session.eor = True
        session.stale_until = None
        swept = self.rib.sweep_stale(event.peer)
        if swept:
            self.log.info("end-of-rib: removed stale routes", peer=event.peer, routes=len(swept))
        return self._kernel_changes(swept)

    def on_speaker_exit(self) -> None:
        """ExaBGP died: every session is gone without notification (we restart it)."""
        kernel: dict[Prefix, Route | None] = {}
        with self._lock:
            for session in self.sessions.values():
                if session.state == "Established":
                    kernel.update(self._on_state(api.PeerState(
                        session.peer.address, "down", "speaker restarted")))
                session.state, session.since = "Idle", time.time()
        if kernel:
            self.reconciler.update("learned", kernel)

    # -- timers ------------------------------------------------------------------------
    def tick(self) -> None:
        """Restart timers, max-prefix hold-downs, release of taken-over kernel routes."""
        now = time.time()
        kernel: dict[Prefix, Route | None] = {}
        with self._lock:
            for address, session in self.sessions.items():
                if session.stale_until and now >= session.stale_until:
                    session.stale_until = None
                    swept = self.rib.sweep_stale(address)
                    self.log.info("restart time over: removed stale routes", peer=address,
                                  routes=len(swept))
                    kernel.update(self._kernel_changes(swept))
                if session.held_down_until and now >= session.held_down_until:
                    session.held_down_until = None
                    self._render_due.set()
            release = not self.stale_released and (
                now - self.started_at >= self.graceful_restart or
                (self.sessions and all(s.state == "Established" and s.eor
                                       for s in self.sessions.values())))
            if release:
                self.stale_released = True
        if kernel:
            self.reconciler.update("learned", kernel)
        if release:
            dropped = self.reconciler.release_stale()
            self.log.info("peers confirmed the routes they still want; released the rest",
                          removed=dropped)

    # -- kernel ------------------------------------------------------------------------
    def _kernel_changes(self, prefixes: set[Prefix]) -> dict[Prefix, Route | None]:
        changes: dict[Prefix, Route | None] = {}
        for prefix in prefixes:
            hops = self.rib.next_hops(prefix)
            if not hops:
                changes[prefix] = None
            else:
                kind: Kind = "borrowed" if prefix.length == prefix.bits else "remote"
                changes[prefix] = remote(prefix, hops, kind)
        return changes

    def _apply_kernel(self, prefixes: set[Prefix]) -> None:
        changes = self._kernel_changes(prefixes)
        if changes:
            self.reconciler.update("learned", changes)

    # -- reading (control socket, metrics) --------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            reflected = self._reflected()  # once, not per peer: it walks the whole RIB
            peers = []
            for address in sorted(self.sessions):
                session = self.sessions[address]
                counts = self.rib.counts(address)
                advertised = len(self.exports) + len(reflected.get(address, ()))
                peers.append({
                    "address": address, "name": session.peer.name, "kind": session.peer.kind,
                    "asn": session.peer.asn, "state": session.state, "since": session.since,
                    "received": counts["received"], "accepted": counts["accepted"],
                    "rejected": counts["rejected"],
                    "advertised": advertised if session.state == "Established" else 0,
                    "last_error": session.last_error, "graceful_restart": session.restart_time,
                    "stale_until": session.stale_until, "flaps": session.flaps,
                    "rejected_by_reason": dict(session.rejected),
                })
            return {"node": self.me.name, "address": self.me.address, "asn": self.me.asn,
                    "route_reflector": self.me.rr_cluster_id, "peers": peers,
                    "exports": sorted(self.exports), "stale_released": self.stale_released}

    def routes(self, peer: str | None, which: str) -> list[dict[str, Any]]:
        if which == "advertised":
            return self._advertised(peer)
        with self._lock:
            rows: list[dict[str, Any]] = []
            for prefix, path in self.rib.received(peer):
                if which == "rejected" and path.accepted:
                    continue
                if which == "accepted" and not path.accepted:
                    continue
                best = path in self.rib.selected.get(prefix, ())
                rows.append({"prefix": str(prefix), "peer": path.peer,
                             "next_hop": path.next_hop, "as_path": list(path.as_path),
                             "accepted": path.accepted, "reason": path.rejected,
                             "best": best, "stale": path.stale})
            return rows

    def _advertised(self, peer: str | None) -> list[dict[str, Any]]:
        with self._lock:
            reflected = self._reflected()
            rows: list[dict[str, Any]] = []
            for address in [peer] if peer else sorted(self.sessions):
                session = self.sessions.get(address)
                if session is None or session.state != "Established":
                    continue
                rows += [{"prefix": exported, "peer": address, "next_hop": self.me.address,
                          "as_path": [], "origin": "local"} for exported in sorted(self.exports)]
                rows += [{"prefix": route.prefix, "peer": address, "next_hop": route.next_hop,
                          "as_path": list(route.as_path), "origin": "reflected"}
                         for route in reflected.get(address, ())]
            return rows


def _describe_reason(reason: str) -> str:
    """ExaBGP's "notification sent (4,0)" with the names of the code and subcode."""
    match = re.search(r"\((\d+),(\d+)\)", reason)
    if "notification" in reason and match:
        return f"{reason} {_notification_text(int(match[1]), int(match[2]))}"
    return reason


def _notification_text(code: int, subcode: int) -> str:
    names = {1: "Message Header Error", 2: "OPEN Message Error", 3: "UPDATE Message Error",
             4: "Hold Timer Expired", 5: "FSM Error", 6: "Cease"}
    cease = {1: "Maximum Number of Prefixes Reached", 2: "Administrative Shutdown",
             3: "Peer De-configured", 4: "Administrative Reset", 5: "Connection Rejected",
             6: "Other Configuration Change", 7: "Connection Collision Resolution"}
    text = names.get(code, "error")
    if code == 6 and subcode in cease:
        text += f" / {cease[subcode]}"
    return text


def borrowed_records(snapshot: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """ipam/borrowed/<node>/<address> keys -> {address: node}."""
    out = {}
    for key in snapshot:
        node, _, address = key[len(keys.BORROWED):].partition("/")
        if node and address:
            out[address] = node
    return out
