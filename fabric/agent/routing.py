"""The BGP side of the agent's state: sessions, the RIB, import policy. Pure.

Inputs are the fabric as etcd describes it (`FabricView`), ExaBGP's events and the
clock; the output of each input is an `Outcome`: the kernel routes learned or lost,
whether ExaBGP's neighbor set or our exports changed, commands for ExaBGP. Nothing
here does I/O or takes a lock: it runs on the agent's owner loop only
(`fabric.agent.loop`), one input at a time, so every decision sees the one before it.

`bgp.peers` decides the neighbors, `bgp.policy` judges what peers send, `bgp.rib`
chooses.

Session loss: a NOTIFICATION (hold timer expired, Cease from a peer shutting down)
removes the peer's routes at once. A session that just drops (the peer's speaker was
killed; the TCP connection closed without a word) is treated as a graceful restart
when the peer advertised it: its routes stay, marked stale, until it is back and sends
End-of-RIB, or its restart time runs out, or it leaves etcd.

Taken-over kernel routes (from before our restart) are released once every session is
up and has sent End-of-RIB, or after our own graceful-restart time, whichever is first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from bgp import api, policy
from bgp.peers import Peer, peers_for
from bgp.rib import Path, Rib
from fabric import logs
from fabric.agent.clock import Clock
from fabric.agent.sessions import STATE_NAMES, Session, describe_reason, notification_text
from fabric.kernel.routes import Kind, Route
from fabric.model.blocks import Block
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import Pool
from fabric.model.prefix import Prefix, address_int

MAX_PREFIX_HOLD_DOWN = 60.0
# A peer that leaves etcd (node record deleted, peer record removed) is kept this long
# first: a record deleted by mistake and written again by its agent, or an etcd restore,
# must not drop the node's routes fabric-wide for the moment it takes to come back.
DEPARTURE_GRACE = 10.0
REJECTIONS_LOGGED = 10  # per peer and reason; beyond that they are counted only


@dataclass(frozen=True)
class FabricView:
    """What etcd says, as the mirrors last saw it."""

    nodes: tuple[Node, ...] = ()
    pools: tuple[Pool, ...] = ()
    blocks: tuple[Block, ...] = ()
    borrowed: Mapping[str, str] = field(default_factory=dict)  # address -> node
    config: BgpConfig = field(default_factory=BgpConfig)
    specs: tuple[PeerSpec, ...] = ()


@dataclass
class Outcome:
    """What one input changed, for the owner loop to carry out."""

    learned: dict[Prefix, Route | None] = field(default_factory=dict)
    selection: set[Prefix] = field(default_factory=set)  # best path changed (reflection)
    peers_changed: bool = False  # ExaBGP's neighbor set must change (config + reload)
    exports_changed: bool = False
    came_up: list[str] = field(default_factory=list)  # sessions now Established
    commands: list[str] = field(default_factory=list)  # for ExaBGP, in order
    node_changed: Node | None = None  # our own record must be written again
    release_stale: bool = False  # taken-over kernel routes may go now


@dataclass(frozen=True)
class Settings:
    hold_time: int = 9
    graceful_restart: int = 120
    ecmp: bool = False
    max_prefixes: int = 100_000
    fixed_asn: int | None = None


class Routing:
    def __init__(self, me: Node, clock: Clock, settings: Settings) -> None:
        self.me = me
        self.clock = clock
        self.settings = settings
        self.log = logs.get("routing", node=me.name)
        self.rib = Rib(ecmp=settings.ecmp)
        self.view = FabricView()
        self.sessions: dict[str, Session] = {}
        self.peers: dict[str, Peer] = {}
        self.departing: dict[str, float] = {}  # peer -> when it goes (monotonic)
        self.exports: frozenset[str] = frozenset()
        self.own_blocks: frozenset[str] = frozenset()
        self.refused_blocks: dict[str, str] = {}  # own blocks we will not route, and why
        self.ctx = policy.PolicyContext(local_as=me.asn)
        self.release_at: float | None = clock.monotonic() + settings.graceful_restart

    @property
    def stale_released(self) -> bool:
        return self.release_at is None

    # -- etcd --------------------------------------------------------------------------
    def set_view(self, **changes: object) -> Outcome:
        """A mirror changed: recompute peers, exports, policy, and what follows."""
        out = Outcome()
        old_view = self.view
        self.view = replace(old_view, **changes)  # type: ignore[arg-type]
        asn = self.settings.fixed_asn or self.view.config.asn
        if asn != self.me.asn:
            self.me = replace(self.me, asn=asn)
            self.log.info("local AS changed", asn=asn)
            out.node_changed = self.me
        self._refresh_peers(out)
        self._refresh_exports(out)
        self._refresh_policy(out)
        self._check_release(out)
        return out

    def _refresh_peers(self, out: Outcome) -> None:
        nodes = [n for n in self.view.nodes if n.name != self.me.name]
        wanted = peers_for(self.me, [self.me, *nodes], self.view.specs, self.view.config)
        now = self.clock.monotonic()
        for address in set(self.peers) - set(wanted):
            if address not in self.departing:
                self.log.info("peer left etcd; keeping it a moment in case it comes back",
                              peer=address, grace=DEPARTURE_GRACE)
                self.departing[address] = now + DEPARTURE_GRACE
        for address in set(self.departing) & set(wanted):
            self.log.info("peer is back", peer=address)
            del self.departing[address]
        for address, peer in wanted.items():
            session = self.sessions.get(address)
            if session is None:
                self.log.info("peer added", peer=address, kind=peer.kind, asn=peer.asn)
                self.sessions[address] = Session(peer, self.clock.time())
            elif session.peer != peer:
                session.peer = peer
            else:
                continue
            out.peers_changed = True
        self.peers = {**{a: self.peers[a] for a in self.departing}, **wanted}

    def _drop_departed(self, out: Outcome) -> None:
        now = self.clock.monotonic()
        for address in [a for a, when in self.departing.items() if now >= when]:
            del self.departing[address]
            self.log.info("peer removed", peer=address)
            self.peers.pop(address, None)
            self.sessions.pop(address, None)
            self._changed(self.rib.drop_peer(address), out)
            out.peers_changed = True
        if out.peers_changed:  # the underlay (peer addresses) changed
            self._refresh_policy(out)
            self._refresh_exports(out)

    def underlay(self) -> set[str]:
        """Addresses BGP itself runs over: a route covering one would cut a session."""
        nodes = [*self.view.nodes, self.me]
        return {a for n in nodes for a in (n.ipv4, n.ipv6) if a} | set(self.peers)

    def underlay_networks(self) -> list[Prefix]:
        """The segments the nodes' underlay addresses sit in (their gateways, etcd)."""
        nodes = [*self.view.nodes, self.me]
        return sorted({Prefix.parse(n) for node in nodes for n in node.networks})

    def _refresh_exports(self, out: Outcome) -> None:
        underlay = [address_int(a) for a in self.underlay()]
        networks = self.underlay_networks()
        own: set[str] = set()
        refused: dict[str, str] = {}
        for block in self.view.blocks:
            if block.affinity != self.me.name:
                continue
            prefix = Prefix.parse(block.cidr)
            covered = [a for a in underlay if a[0] == prefix.family
                       and prefix.contains(Prefix(a[0], a[1], prefix.bits))]
            if covered:
                refused[block.cidr] = "contains an underlay address (a node or BGP peer)"
                continue
            segment = next((n for n in networks if n.overlaps(prefix)), None)
            if segment is not None:
                refused[block.cidr] = f"overlaps the underlay network {segment}"
                continue
            if not any(p.block_size == prefix.length and Prefix.parse(p.cidr).contains(prefix)
                       for p in self.view.pools):
                # Written by hand or left from a deleted pool: every peer's import
                # policy refuses it (pools bound what nodes may announce), so our
                # containers in it would be reachable from nowhere. Said here.
                refused[block.cidr] = "not a block of any IP pool"
                continue
            own.add(block.cidr)
        for cidr in set(refused) - set(self.refused_blocks):
            self.log.error("not routing our own block", block=cidr, reason=refused[cidr])
        self.refused_blocks = refused
        borrowed = {f"{a}/{128 if ':' in a else 32}" for a, n in self.view.borrowed.items()
                    if n == self.me.name}
        exports = frozenset(own | borrowed)
        if exports != self.exports:
            out.exports_changed = True
        self.exports = exports
        self.own_blocks = frozenset(own)

    def _refresh_policy(self, out: Outcome) -> None:
        nodes = {n.name: n for n in self.view.nodes}
        nodes[self.me.name] = self.me

        def origin(node_name: str | None) -> policy.Origin | None:
            node = nodes.get(node_name or "")
            return policy.Origin(node.name, node.ipv4, node.asn, node.ipv6) if node else None

        blocks = {b.cidr: o for b in self.view.blocks if b.affinity
                  for o in [origin(b.affinity)] if o is not None}
        borrowed = {f"{a}/{128 if ':' in a else 32}": o for a, n in self.view.borrowed.items()
                    for o in [origin(n)] if o is not None}
        ctx = policy.PolicyContext.build(
            self.me.asn, [(p.cidr, p.block_size) for p in self.view.pools if not p.disabled],
            [b.cidr for b in self.view.blocks if b.affinity == self.me.name],
            self.underlay(), blocks, borrowed, self.me.bgp_id, self.me.rr_cluster_id or "",
            self.underlay_networks())
        if ctx == self.ctx:
            return
        self.ctx = ctx
        self._changed(self.rib.reevaluate(self._judge), out)

    def _judge(self, prefix: Prefix, path: Path) -> str | None:
        if path.rejected == policy.MAX_PREFIX:
            return path.rejected
        return policy.evaluate(prefix, path.next_hop, path.as_path, self.ctx,
                               path.originator if path.cluster_list else "",
                               path.cluster_list)

    # -- ExaBGP events -----------------------------------------------------------------
    def on_event(self, event: api.Event) -> Outcome:
        out = Outcome()
        if isinstance(event, api.Update):
            self._on_update(event, out)
        elif isinstance(event, api.PeerState):
            self._on_state(event, out)
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
                                      f" {notification_text(event.code, event.subcode)}")
        elif isinstance(event, api.EndOfRib):
            self._on_eor(event, out)
        return out

    def _on_update(self, update: api.Update, out: Outcome) -> None:
        session = self.sessions.get(update.peer)
        if session is None or session.held_down_until:
            return
        peer = update.peer
        changed: set[Prefix] = set()
        for text in update.withdrawn:
            try:
                prefix = Prefix.parse(text)
            except ValueError:
                continue
            if self.rib.withdraw(peer, prefix):
                changed.add(prefix)
        limit = session.peer.max_prefixes or self.settings.max_prefixes
        incoming = sum(len(v) for v in update.announced.values())
        have = len(self.rib.by_peer.get(peer, ()))
        if incoming and have + incoming > limit:
            self._trip_max_prefix(session, limit, have + incoming, changed, out)
            return
        attrs = update.attributes
        as_path, clusters = attrs.as_path, attrs.cluster_list
        # The source's BGP identifier: the ORIGINATOR_ID of a reflected route, else the
        # peer's own router id (from its OPEN); best-path selection ranks by it.
        originator = attrs.originator_id or session.router_id
        ctx, parse, evaluate, announce = self.ctx, Prefix.parse, policy.evaluate, self.rib.announce
        for next_hop, prefixes in update.announced.items():
            for text in prefixes:
                try:
                    prefix = parse(text)
                except ValueError:
                    session.rejected[policy.BAD_PREFIX] += 1
                    continue
                verdict = evaluate(prefix, next_hop, as_path, ctx, attrs.originator_id,
                                   clusters)
                if verdict is not None:
                    self._count_rejection(session, verdict, text, next_hop)
                if announce(peer, prefix, Path(peer, next_hop, as_path, verdict, False,
                                               originator, clusters)):
                    changed.add(prefix)
        self._changed(changed, out)

    def _count_rejection(self, session: Session, verdict: str, prefix: str,
                         next_hop: str) -> None:
        session.rejected[verdict] += 1
        count = session.rejected[verdict]
        if count <= REJECTIONS_LOGGED:
            extra = {"more": "further rejections for this reason are only counted"} \
                if count == REJECTIONS_LOGGED else {}
            self.log.info("route rejected", peer=session.peer.address, prefix=prefix,
                          next_hop=next_hop, reason=verdict, **extra)

    def _trip_max_prefix(self, session: Session, limit: int, count: int,
                         changed: set[Prefix], out: Outcome) -> None:
        peer = session.peer.address
        session.rejected[policy.MAX_PREFIX] += count - len(self.rib.by_peer.get(peer, ()))
        session.last_error = (f"max-prefix {limit} exceeded ({count} received); "
                              f"held down for {MAX_PREFIX_HOLD_DOWN:.0f}s")
        session.held_down_until = self.clock.monotonic() + MAX_PREFIX_HOLD_DOWN
        session.state, session.since = "Idle", self.clock.time()
        self.log.warning("max-prefix exceeded; closing session", peer=peer, limit=limit,
                         received=count)
        changed |= self.rib.drop_peer(peer)
        out.commands.append(api.teardown(peer, 1))  # Cease: maximum prefixes reached
        out.peers_changed = True  # the peer leaves ExaBGP's config while held down
        self._changed(changed, out)

    def _on_state(self, event: api.PeerState, out: Outcome) -> None:
        session = self.sessions.get(event.peer)
        if session is None:
            return
        state = STATE_NAMES.get(event.state, event.state)
        if state == session.state:
            return
        was_up = session.established
        session.state, session.since = state, self.clock.time()
        log = self.log.bind(peer=event.peer)
        if state == "Established":
            session.eor = False
            out.came_up.append(event.peer)
            log.info("session established")
            return
        if not was_up or event.state != "down":
            return
        self._session_lost(session, event.reason or "closed", out)

    def _session_lost(self, session: Session, reason: str, out: Outcome) -> None:
        address = session.peer.address
        log = self.log.bind(peer=address)
        session.flaps += 1
        session.last_error = describe_reason(reason)
        if session.restart_time and "notification" not in reason:
            self._changed(self.rib.mark_stale(address), out)
            session.stale_until = self.clock.monotonic() + session.restart_time
            log.info("session lost without notification; keeping its routes as stale",
                     routes=len(self.rib.by_peer.get(address, ())),
                     restart_time=session.restart_time)
            return
        log.info("session down; withdrawing its routes", reason=reason)
        session.stale_until = None
        self._changed(self.rib.drop_peer(address), out)

    def _on_eor(self, event: api.EndOfRib, out: Outcome) -> None:
        session = self.sessions.get(event.peer)
        if session is None:
            return
        session.eor = True
        session.stale_until = None
        swept = self.rib.sweep_stale(event.peer)
        if swept:
            self.log.info("end-of-rib: removed stale routes", peer=event.peer,
                          routes=len(swept))
        self._changed(swept, out)
        self._check_release(out)

    def on_speaker_exit(self) -> Outcome:
        """ExaBGP died: every session is gone without notification (we restart it)."""
        out = Outcome()
        now = self.clock.time()
        for session in self.sessions.values():
            if session.established:
                self._session_lost(session, "speaker restarted", out)
            session.state, session.since = "Idle", now
        return out

    # -- timers ------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        deadlines = [d for s in self.sessions.values()
                     for d in (s.stale_until, s.held_down_until) if d is not None]
        deadlines += self.departing.values()
        if self.release_at is not None:
            deadlines.append(self.release_at)
        return min(deadlines, default=None)

    def tick(self) -> Outcome:
        """Restart timers, max-prefix hold-downs, release of taken-over kernel routes."""
        out = Outcome()
        now = self.clock.monotonic()
        for address, session in self.sessions.items():
            if session.stale_until is not None and now >= session.stale_until:
                session.stale_until = None
                swept = self.rib.sweep_stale(address)
                self.log.info("restart time over: removed stale routes", peer=address,
                              routes=len(swept))
                self._changed(swept, out)
            if session.held_down_until is not None and now >= session.held_down_until:
                session.held_down_until = None
                self.log.info("max-prefix hold-down over; session allowed again",
                              peer=address)
                out.peers_changed = True
        self._drop_departed(out)
        self._check_release(out)
        return out

    def _check_release(self, out: Outcome) -> None:
        if self.release_at is None:
            return
        sessions = self.sessions.values()
        confirmed = bool(self.sessions) and all(s.established and s.eor for s in sessions)
        if confirmed or self.clock.monotonic() >= self.release_at:
            self.release_at = None
            out.release_stale = True

    # -- results -----------------------------------------------------------------------
    def _changed(self, prefixes: set[Prefix], out: Outcome) -> None:
        learned, route = out.learned, self.kernel_route
        for prefix in prefixes:
            learned[prefix] = route(prefix)
        out.selection |= prefixes

    def kernel_route(self, prefix: Prefix) -> Route | None:
        hops = self.rib.next_hops(prefix)  # sorted, distinct
        if not hops:
            return None
        kind: Kind = "borrowed" if prefix.length == (128 if prefix.family == 6 else 32) \
            else "remote"
        return Route(prefix, "unicast", hops, 0, kind)

    def active_peers(self) -> dict[str, Peer]:
        """The neighbors ExaBGP should have now (held-down ones are left out)."""
        return {a: p for a, p in self.peers.items()
                if self.sessions[a].held_down_until is None}
