"""What ExaBGP must hold and say for us: its configuration and API commands. Pure.

Two kinds of routes leave this node:

* our own (blocks with our affinity, borrowed /32s): in the configuration file as
  static routes (they survive an ExaBGP restart and go out before End-of-RIB), and
  announced or withdrawn through the API the moment they change;
* routes this node reflects, when it is a route reflector: API only, per client, with
  ORIGINATOR_ID and CLUSTER_LIST (RFC 4456), computed for the prefixes whose best
  path changed, not by walking the RIB.

The configuration is rendered again when the neighbors or our routes change; ExaBGP
is asked to reload it only when the neighbors changed. When a session comes up, that
neighbor is sent everything it should have: ExaBGP keeps API announcements across
a session flap, but not across its own restart, and a neighbor added by a reload
never saw the announcements made before it existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bgp import api
from bgp.config import SpeakerSettings, render
from bgp.peers import Peer
from fabric.agent.routing import Outcome, Routing
from fabric.model.prefix import Prefix


@dataclass
class SpeakerPlan:
    """What the speaker adapter must do, in order: write (and maybe reload), then send."""

    config: str | None = None
    reload: bool = False
    commands: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.config is not None or bool(self.commands)


class Announcer:
    def __init__(self, relay_command: Sequence[str] = ()) -> None:
        self.relay_command = tuple(relay_command)
        self.config = ""
        self.announced: frozenset[str] = frozenset()  # our own routes, as last announced
        self.leaving = False  # the machine is going down: announce nothing again
        self.reflected: dict[str, dict[str, api.Reflected]] = {}  # per neighbor

    def settings(self, routing: Routing) -> SpeakerSettings:
        s, me = routing.settings, routing.me
        return SpeakerSettings(me.bgp_id, me.asn, s.hold_time, s.graceful_restart,
                               self.relay_command, me.ipv4, me.ipv6)

    def initial(self, routing: Routing) -> str:
        """The configuration ExaBGP starts with (it already holds our routes)."""
        self.config = render(self.settings(routing), routing.active_peers(), routing.exports)
        self.announced = routing.exports
        self.reflected = self._all_reflected(routing)
        return self.config

    def plan(self, routing: Routing, outcome: Outcome) -> SpeakerPlan:
        plan = SpeakerPlan(commands=list(outcome.commands))
        exports = frozenset() if self.leaving else routing.exports
        if outcome.peers_changed or outcome.exports_changed or outcome.node_changed:
            config = render(self.settings(routing), routing.active_peers(), exports)
            if config != self.config:
                self.config = config
                plan.config = config
                plan.reload = outcome.peers_changed or outcome.node_changed is not None
        if exports != self.announced:
            plan.commands += api.withdraw(self.announced - exports)
            plan.commands += api.announce_self(exports - self.announced)
            self.announced = exports
        if routing.me.rr_cluster_id:
            if outcome.peers_changed:
                self._reflect_all(routing, plan)
            elif outcome.selection:
                self._reflect(routing, outcome.selection, plan)
        for peer in outcome.came_up:
            plan.commands += self.full(peer)
        return plan

    def leave(self) -> list[str]:
        """Withdraw every route of ours, and announce none from now on (see m.Leave)."""
        self.leaving = True
        commands = api.withdraw(self.announced)
        self.announced = frozenset()
        return commands

    def full(self, peer: str) -> list[str]:
        """Everything one neighbor should have from us (of its session's family)."""
        ipv6 = ":" in peer
        commands = api.announce_self([p for p in self.announced if (":" in p) == ipv6], peer)
        commands += api.announce_reflected(peer, self.reflected.get(peer, {}).values())
        return commands

    # -- reflection --------------------------------------------------------------------
    def _reflect(self, routing: Routing, prefixes: Iterable[Prefix], plan: SpeakerPlan) -> None:
        clients = _ibgp(routing)
        withdrawn: dict[str, list[str]] = {}
        announced: dict[str, list[api.Reflected]] = {}
        for prefix in sorted(prefixes):
            text = str(prefix)
            now = _reflected_for(routing, prefix, clients)
            for peer in clients:
                before = self.reflected.get(peer, {}).get(text)
                after = now.get(peer)
                if after == before:
                    continue
                if after is None:
                    self.reflected[peer].pop(text)
                    withdrawn.setdefault(peer, []).append(text)
                else:
                    self.reflected.setdefault(peer, {})[text] = after
                    announced.setdefault(peer, []).append(after)
        for peer in clients:
            plan.commands += api.withdraw(withdrawn.get(peer, ()), peer)
            plan.commands += api.announce_reflected(peer, announced.get(peer, ()))

    def _reflect_all(self, routing: Routing, plan: SpeakerPlan) -> None:
        """The neighbors changed: recompute what each is reflected (walks the RIB once)."""
        wanted = self._all_reflected(routing)
        for peer in set(self.reflected) | set(wanted):
            old, new = self.reflected.get(peer, {}), wanted.get(peer, {})
            if peer not in routing.peers:
                continue  # gone from ExaBGP's configuration: nothing to withdraw from
            plan.commands += api.withdraw(set(old) - set(new), peer)
            plan.commands += api.announce_reflected(
                peer, [r for p, r in new.items() if old.get(p) != r])
        self.reflected = wanted

    def _all_reflected(self, routing: Routing) -> dict[str, dict[str, api.Reflected]]:
        if not routing.me.rr_cluster_id:
            return {}
        clients = _ibgp(routing)
        out: dict[str, dict[str, api.Reflected]] = {}
        for prefix in routing.rib.selected_prefixes():
            for peer, route in _reflected_for(routing, prefix, clients).items():
                out.setdefault(peer, {})[route.prefix] = route
        return out


def _ibgp(routing: Routing) -> dict[str, Peer]:
    """iBGP neighbors that take part in reflection (clients and other reflectors)."""
    return {a: p for a, p in routing.peers.items() if p.asn == routing.me.asn
            and p.kind in ("rr-client", "reflector")}


def _reflected_for(routing: Routing, prefix: Prefix, ibgp: dict[str, Peer]
                   ) -> dict[str, api.Reflected]:
    """Who gets `prefix` reflected, and how (RFC 4456: client routes to everyone,
    non-client routes to clients only; never back to where it came from)."""
    paths = routing.rib.best(prefix)
    cluster = routing.me.rr_cluster_id
    if not paths or not cluster:
        return {}
    best = paths[0]
    source = ibgp.get(best.peer)
    if source is None:
        return {}
    session = routing.sessions.get(best.peer)
    originator = best.originator or (session.router_id if session else "") or best.peer
    route = api.Reflected(str(prefix), best.next_hop, best.as_path, originator,
                          (cluster, *best.cluster_list))
    return {address: route for address, peer in ibgp.items()
            if address != best.peer and best.next_hop != address
            and peer.family == prefix.family
            and (source.kind == "rr-client" or peer.kind == "rr-client")}
