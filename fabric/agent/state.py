"""The agent's state and every decision about it, owned by one loop. Pure.

`AgentState.handle(message)` takes one input (see `fabric.agent.messages`) and returns
the jobs it decided on, in order; `tick()` does the same for deadlines that passed.
It never does I/O, never takes a lock and never reads the clock except through the
injected one: the owner loop (`fabric.agent.loop`) is its only caller, one message at
a time, and hands the jobs to the adapters. So the kernel, ExaBGP and etcd see our
decisions in the order they were made, by construction, and the tests drive it with
hand-made messages in any order they like.

What it owns:

* `routing`: sessions, RIB, import policy, our exports (`fabric.agent.routing`);
* `desired`: the kernel routes we want, by source (`fabric.agent.desired`);
* `workloads`: this node's workloads and host links (`fabric.agent.workloads`);
* `announcer`: ExaBGP's configuration and what it was told (`fabric.agent.exports`);
* `policy`: policies, labels and this host's nftables rule model (`fabric.agent.policy`);
* what the adapters last reported: kernel counters and drift, ExaBGP's process,
  the registration, etcd errors; the periodic jobs' deadlines.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bgp import api
from fabric import logs
from fabric.agent import messages as m
from fabric.agent.clock import Clock
from fabric.agent.desired import DesiredRoutes, KernelBatch
from fabric.agent.exports import Announcer
from fabric.agent.policy import PolicyView
from fabric.agent.routing import Outcome, Routing, Settings
from fabric.agent.workloads import Workloads, names
from fabric.kernel.routes import Applied, Drift, EventsLost, Resynced, RouteEvent, blackhole
from fabric.model import checks
from fabric.model.blocks import Block
from fabric.model.nodes import Node, Workload
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import Pool, pool_of
from fabric.model.prefix import Prefix
from fabric.store import keys
from ipam.blocks import block_containing

T = TypeVar("T")
MIRRORS = ("pools", "nodes", "blocks", "borrowed", "bgp-config", "bgp-peers", "workloads",
           "policies", "namespaces")
EVENT_RESYNC_GAP = 0.5  # seconds between resyncs prompted by route events, at least
SPEAKER_GRACE = 15.0  # seconds ExaBGP may be down or unconnected (a restart) unreported
# ExaBGP exiting this often within the window is a crash loop, though each restart
# connects again within SPEAKER_GRACE: sessions flap, and peers see it. It is over once
# ExaBGP has stayed connected for SPEAKER_GRACE.
CRASH_LOOP_EXITS, CRASH_LOOP_WINDOW = 3, 300.0


@dataclass(frozen=True)
class Intervals:
    """How often the periodic jobs run (seconds)."""

    resync: float = 10.0
    links: float = 10.0
    gc: float = 60.0
    gc_first: float = 30.0
    liveness: float = 20 / 3
    gone_grace: float = 60.0  # a registration without its host link this long: released
    host: float = 30.0  # forwarding and NAT checked (an iptables call per family in use)


@dataclass
class KernelStats:
    applied: int = 0
    failures: int = 0
    resyncs: int = 0
    repaired: int = 0
    last_resync_seconds: float = 0.0
    last_apply_seconds: float = 0.0
    apply_seconds_total: float = 0.0


@dataclass
class SpeakerInfo:
    generation: int = 0
    pid: int | None = None
    running: bool = False
    connected: bool = False
    started_at: float = 0.0
    restarts: int = 0
    reloads: int = 0
    reloads_refused: int = 0
    api_errors: int = 0
    last_restart_reason: str = ""  # why the agent last restarted ExaBGP itself
    down_since: float | None = None  # monotonic: not running, or its API not connected
    exits: list[float] = field(default_factory=list)  # monotonic, within CRASH_LOOP_WINDOW
    connected_since: float | None = None  # monotonic


@dataclass
class RegistrationInfo:
    registered: bool = False  # our record in etcd is the one we wrote
    in_flight: bool = False
    last_error: str = ""
    last_refresh: float = 0.0  # liveness lease refreshed (wall clock)
    ttl: int = 0


@dataclass
class Counters:
    etcd_errors: int = 0
    gc_runs: int = 0
    gc_released: int = 0
    orphans_restored: int = 0
    orphans_removed: int = 0
    orphans_adopted: int = 0
    gone_released: int = 0
    blocks_restored: int = 0
    host_repairs: int = 0


@dataclass
class AgentState:
    me: Node
    clock: Clock
    settings: Settings
    intervals: Intervals = field(default_factory=Intervals)
    relay_command: tuple[str, ...] = ()
    nat_outgoing: bool = True

    def __post_init__(self) -> None:
        self.log = logs.get("agent.state", node=self.me.name)
        self.registered_record = self.me  # what we last wrote to etcd
        self.routing = Routing(self.me, self.clock, self.settings)
        self.desired = DesiredRoutes()
        self.workloads = Workloads()
        self.announcer = Announcer(self.relay_command)
        self.policy = PolicyView(self.me.name)
        self.dns_names: Mapping[str, tuple[str, ...]] = {}  # replaced whole, never mutated
        self.mirrors_seen: set[str] = set()
        self.ignored: dict[str, dict[str, str]] = {}  # mirror -> key -> why not used
        self._good: dict[str, dict[str, Any]] = {}  # mirror -> key -> last usable record
        self._raw: dict[str, dict[str, Any]] = {}  # mirror -> key -> the value it came from
        self.speaker_live = False  # ExaBGP was started with `initial_config()`
        self.kernel = KernelStats()
        self.drift: collections.deque[Drift] = collections.deque(maxlen=100)
        self.failed: dict[Prefix, str] = {}
        self.resync_pending = False
        self.applies_in_flight = 0  # ApplyRoutes jobs the writer has not reported yet
        self.speaker = SpeakerInfo()
        self.registration = RegistrationInfo(registered=True)
        self.counters = Counters()
        self.nat_applied: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self.restoring_blocks: set[str] = set()  # RestoreBlock jobs not finished yet
        self.last_host_repair = ""
        self.event_resync_after = 0.0  # monotonic: an event may prompt a resync from then
        now = self.clock.monotonic()
        self.due: dict[str, float] = {
            "resync": now, "links": now, "host": now + self.intervals.host,
            "gc": now + self.intervals.gc_first,
            "liveness": now + self.intervals.liveness, "policy": now}

    # -- the entry points --------------------------------------------------------------
    def handle(self, message: object) -> list[m.Job]:
        jobs: list[m.Job] = []
        if isinstance(message, m.Snapshot):
            self._on_snapshot(message, jobs)
        elif isinstance(message, m.BgpEvent):
            if message.generation == self.speaker.generation:
                if isinstance(message.event, api.Ack):
                    self.speaker.api_errors += 0 if message.event.ok else 1
                else:
                    self._carry_out(self.routing.on_event(message.event), jobs)
        elif isinstance(message, m.SpeakerStatus):
            self._on_speaker(message, jobs)
        elif isinstance(message, m.Leave):
            jobs += [m.Send(tuple(self.announcer.leave())), m.Flush(message.reply)]
        elif isinstance(message, m.ReloadStatus):
            self.speaker.reloads += 1
            self.speaker.reloads_refused += 0 if message.ok else 1
        elif isinstance(message, Applied):
            self._on_applied(message)
        elif isinstance(message, Resynced):
            self._on_resynced(message)
        elif isinstance(message, RouteEvent):
            self._on_route_event(message, jobs)
        elif isinstance(message, EventsLost):
            self._request_resync(jobs)
        elif isinstance(message, m.Attach):
            self.workloads.attach(message.handle, message.ips, message.host_ifname,
                                  message.index)
            self.policy.attach(message.handle, message.ips, message.namespace,
                               dict(message.labels), message.name, message.host_ifname)
            # Rules first, then the route, in the writer's one queue: the workload is
            # never reachable before its policy is enforced (the route waits on it).
            self._policy(jobs, reply=message.policy_reply)
            self._apply(self._workload_routes(), jobs, reply=message.reply,
                        guard=message.policy_reply)
        elif isinstance(message, m.Detach):
            self.workloads.detach(message.handle, message.host_ifname)
            batch = self._workload_routes()
            gone = tuple(p for p in map(Prefix.parse, message.ips)
                         if self.desired.wanted(p) is None and p not in batch.delete)
            # Addresses DEL names but no route of ours did (a half-made ADD): make sure.
            self._apply(KernelBatch(batch.replace, batch.delete + gone), jobs,
                        reply=message.reply)
            self.policy.detach(message.handle)
            self._policy(jobs)  # its addresses leave the sets once its route is gone
        elif isinstance(message, m.LinksListed):
            now = self.clock.monotonic()
            for orphan in self.workloads.on_links(message.links, now):
                jobs.append(m.ResolveOrphan(orphan))
            for handle, link in self.workloads.gone(now, self.intervals.gone_grace):
                self.log.info("workload's host link gone; releasing it", handle=handle,
                              link=link)
                jobs.append(m.ReleaseGone(handle, link))
            self._apply(self._workload_routes(), jobs)
            self._policy(jobs)
        elif isinstance(message, m.JobDone):
            self._on_job_done(message, jobs)
        elif isinstance(message, m.PolicyDone):
            if not message.check:
                self.policy.in_flight = max(0, self.policy.in_flight - 1)
            self.policy.on_report(message.report, message.check)
            if self.policy.dirty and not self.policy.in_flight:
                self._policy(jobs)
        else:
            raise TypeError(f"not an input of the agent: {message!r}")
        return jobs

    def tick(self) -> list[m.Job]:
        jobs: list[m.Job] = []
        self._carry_out(self.routing.tick(), jobs)
        now = self.clock.monotonic()
        if now >= self.due["resync"]:
            if self.applies_in_flight:  # busy (a bulk update): repair once it is idle
                self.due["resync"] = now + 1.0
            else:
                # A resync of a big table costs (a 100,000-route dump is about a second):
                # keep the periodic one under 2% of the time it takes.
                self.due["resync"] = now + max(self.intervals.resync,
                                               50 * self.kernel.last_resync_seconds)
                self._request_resync(jobs)
        if now >= self.due["policy"]:
            # Listing a big table costs too (1,000 policies: a few hundred ms of CPU):
            # like the routes' resync, keep the periodic check under 2% of the time.
            self.due["policy"] = now + max(self.intervals.resync,
                                           50 * self.policy.stats.last_check_seconds)
            self._check_policy(jobs)
        if now >= self.due["links"]:
            self.due["links"] = now + self.intervals.links
            jobs.append(m.ListLinks())
        if now >= self.due["gc"]:
            self.due["gc"] = now + self.intervals.gc
            jobs.append(m.CollectGarbage())
        if now >= self.due["host"]:
            self.due["host"] = now + self.intervals.host
            jobs.append(m.CheckHost())
        if now >= self.due["liveness"]:
            self.due["liveness"] = now + self.intervals.liveness
            jobs.append(m.RefreshLiveness())
        return jobs

    def next_deadline(self) -> float:
        routing = self.routing.next_deadline()
        due = min(self.due.values())
        return due if routing is None else min(due, routing)

    @property
    def ready(self) -> bool:
        """Every mirror has reported once: the view of etcd is complete."""
        return self.mirrors_seen >= set(MIRRORS)

    def initial_config(self) -> str:
        """ExaBGP's first configuration (call once the view is complete)."""
        self.speaker_live = True
        return self.announcer.initial(self.routing)

    # -- etcd mirrors ------------------------------------------------------------------
    def _on_snapshot(self, snap: m.Snapshot, jobs: list[m.Job]) -> None:
        self.mirrors_seen.add(snap.name)
        self._handle_snapshot(snap, jobs)
        if snap.name in ("blocks", "workloads", "pools"):
            self._check_blocks(jobs)

    def _check_blocks(self, jobs: list[m.Job]) -> None:
        """Every block our workloads have addresses in must have its record: one deleted
        by hand stops us announcing it (its containers unreachable) and lets another
        node claim it. Borrowed addresses are another node's business."""
        if not {"blocks", "workloads", "pools", "borrowed"} <= self.mirrors_seen:
            return
        view = self.routing.view
        have = {b.cidr for b in view.blocks}
        missing: dict[str, str] = {}
        for known in self.workloads.registered.values():
            for ip in known.ips:
                address = ip.partition("/")[0]
                pool = pool_of(address, view.pools)
                if pool is None or address in view.borrowed:
                    continue
                cidr = block_containing(pool, address)
                if cidr not in have:
                    missing[cidr] = pool.name
        for cidr in sorted(set(missing) - self.restoring_blocks):
            self.log.warning("a block our workloads use has no record; restoring it",
                             block=cidr)
            jobs.append(m.RestoreBlock(cidr, missing[cidr]))
        self.restoring_blocks = set(missing)

    def _handle_snapshot(self, snap: m.Snapshot, jobs: list[m.Job]) -> None:
        if snap.name == "pools":
            pools = self._decode(snap, _value(Pool.from_record))
            self._carry_out(self.routing.set_view(pools=pools), jobs)
            self._nat(pools, jobs)
            self.policy.on_pools(p.family for p in pools)
            self._policy(jobs)
        elif snap.name == "nodes":
            nodes = self._decode(snap, _value(Node.from_record))
            self._carry_out(self.routing.set_view(nodes=nodes), jobs)
            self._check_registration(nodes, jobs)
        elif snap.name == "blocks":
            blocks = self._decode(snap, _value(Block.from_record))
            self._carry_out(self.routing.set_view(blocks=blocks), jobs)
        elif snap.name == "borrowed":
            borrowed = dict(self._decode(snap, borrowed_record))
            self._carry_out(self.routing.set_view(borrowed=borrowed), jobs)
        elif snap.name == "bgp-config":
            configs = self._decode(snap, _value(BgpConfig.from_record))
            config = configs[0] if configs else BgpConfig()
            self._carry_out(self.routing.set_view(config=config), jobs)
        elif snap.name == "bgp-peers":
            specs = self._decode(snap, _value(PeerSpec.from_record))
            self._carry_out(self.routing.set_view(specs=specs), jobs)
        elif snap.name == "workloads":
            everyone = self._decode(snap, _value(Workload.from_record))
            self.dns_names = names(everyone)
            self.workloads.on_registrations(w for w in everyone if w.node == self.me.name)
            self._apply(self._workload_routes(), jobs)
            self.policy.on_workloads(everyone)
            self._policy(jobs)
        elif snap.name == "policies":
            self.policy.on_policies(snap.records, snap.unreadable)
            self._policy(jobs)
        elif snap.name == "namespaces":
            self.policy.on_namespaces(snap.records)
            self._policy(jobs)
        else:
            raise ValueError(f"unknown mirror {snap.name!r}")

    def _decode(self, snap: m.Snapshot, parse: Callable[[str, dict[str, Any]], T]
                ) -> tuple[T, ...]:
        """Every record of a mirror that is usable. One that is not (unreadable, or a
        field that is not what it must be) is not acted on: its key keeps its last
        usable record, if it had one (an unreadable node record must not look like the
        node leaving), and it is reported (`ignored_records` in status)."""
        good, raw = self._good.get(snap.name, {}), self._raw.get(snap.name, {})
        ignored = {k: why for k, why in self.ignored.get(snap.name, {}).items()
                   if k in snap.records and snap.records[k] is raw.get(k)}
        ignored.update(snap.unreadable)
        usable: dict[str, Any] = {}
        for key, value in snap.records.items():
            if value is raw.get(key) and key not in snap.unreadable:
                if key in good:  # the same value as last time: parsed then (a mirror
                    usable[key] = good[key]  # keeps unchanged values as they were)
                continue
            try:
                usable[key] = parse(key, dict(value))
            except checks.NOT_A_RECORD as exc:
                ignored[key] = str(exc) or type(exc).__name__
                if key in good:
                    usable[key] = good[key]
        before = self.ignored.get(snap.name, {})
        for key in sorted(set(ignored) - set(before)):
            self.log.warning("ignoring an etcd record", key=key, reason=ignored[key])
        self.ignored[snap.name] = ignored
        self._good[snap.name] = usable
        self._raw[snap.name] = dict(snap.records)
        return tuple(usable.values())

    def _check_registration(self, nodes: Iterable[Node], jobs: list[m.Job]) -> None:
        """Our record must be in etcd as we wrote it: deleted, changed or made
        unreadable behind our back, it is written again (unless another host holds the
        name: that is refused)."""
        ours = next((n for n in nodes if n.name == self.me.name), None)
        if keys.node(self.me.name) in self.ignored.get("nodes", {}):
            ours = None  # what is there is not our record, whatever we read before
        self.registration.registered = ours == self.registered_record
        if not self.registration.registered and not self.registration.in_flight:
            if ours is None:
                self.log.warning("our node record is gone from etcd; registering again")
            else:
                self.log.warning("our node record was changed in etcd; writing it again",
                                 found=ours.address)
            self.registration.in_flight = True
            jobs.append(m.RegisterNode(self.routing.me))

    def _nat(self, pools: Iterable[Pool], jobs: list[m.Job]) -> None:
        if not self.nat_outgoing:
            return
        pools = list(pools)
        wanted = (tuple(sorted(p.cidr for p in pools if p.nat_outgoing)),
                  tuple(sorted(p.cidr for p in pools)))
        if wanted != self.nat_applied:
            self.nat_applied = wanted
            jobs.append(m.ApplyNat(*wanted))

    # -- BGP and ExaBGP ----------------------------------------------------------------
    def _carry_out(self, out: Outcome, jobs: list[m.Job]) -> None:
        """Turn what routing decided into jobs: kernel first, then ExaBGP, then etcd."""
        if out.learned:
            self._apply(self.desired.update("learned", out.learned), jobs)
        if out.exports_changed:
            own = {Prefix.parse(c) for c in self.routing.own_blocks}
            self._apply(self.desired.replace("blackholes", {p: blackhole(p) for p in own}),
                        jobs)
        if out.release_stale:
            batch = self.desired.release_stale()
            self.log.info("peers confirmed the routes they still want; releasing the rest",
                          removed=len(batch.delete))
            self._apply(batch, jobs)
        if self.speaker_live:
            plan = self.announcer.plan(self.routing, out)
            if plan.config is not None:
                jobs.append(m.Configure(plan.config, plan.reload))
            if plan.commands:
                jobs.append(m.Send(tuple(plan.commands)))
        if out.node_changed is not None:
            self.registered_record = out.node_changed
            self.registration.in_flight = True
            jobs.append(m.RegisterNode(out.node_changed))

    def _on_speaker(self, status: m.SpeakerStatus, jobs: list[m.Job]) -> None:
        info = self.speaker
        if status.state == "started":
            info.generation, info.pid, info.running = status.generation, status.pid, True
            info.connected, info.started_at = False, self.clock.time()
        elif status.generation != info.generation:
            return
        elif status.state == "connected":
            info.connected = True
            info.down_since = None
            info.connected_since = self.clock.monotonic()
        elif status.state == "restarting":
            info.connected = False
            info.last_restart_reason = status.reason
        elif status.state == "exited":
            info.running = info.connected = False
            info.restarts += 1
            now = self.clock.monotonic()
            info.exits = [t for t in info.exits if now - t < CRASH_LOOP_WINDOW] + [now]
            self._carry_out(self.routing.on_speaker_exit(), jobs)
        if not info.connected and info.down_since is None:
            info.down_since = self.clock.monotonic()

    # -- the kernel --------------------------------------------------------------------
    def _apply(self, batch: KernelBatch, jobs: list[m.Job], reply: Any = None,
               guard: Any = None) -> None:
        if batch or reply is not None:
            self.applies_in_flight += 1
            jobs.append(m.ApplyRoutes(batch.replace, batch.delete, reply, guard))

    # -- network policy ------------------------------------------------------------------
    def _policy(self, jobs: list[m.Job], reply: Any = None) -> None:
        """Hand the writer this host's rules when they changed (and only once the view
        of etcd is complete: rules computed from half a view could open a hole; the
        table a previous run left stays enforced until then).

        While an apply is in flight, changes from etcd are coalesced: the rules are
        computed again once it is done, so a burst (1,000 policies arrive as 16
        transactions) costs one or two applies, not sixteen. An ADD never waits: its
        workload's rules go now, ahead of its route."""
        if not self.ready:
            if reply is not None:
                jobs.append(m.ApplyPolicy(None, reply=reply))
            return
        if reply is None and self.policy.in_flight:
            self.policy.dirty = True
            return
        self.policy.dirty = False
        rules = self.policy.desired(self.workloads.known(), self.workloads.detached)
        full = self.policy.retry
        if rules != self.policy.sent or full:
            self.policy.sent = rules
            self.policy.sent_digest = rules.digest()
            self.policy.retry = False
            self.policy.in_flight += 1
            jobs.append(m.ApplyPolicy(rules, full, reply))
        elif reply is not None:
            jobs.append(m.ApplyPolicy(None, reply=reply))

    def _check_policy(self, jobs: list[m.Job]) -> None:
        if self.policy.retry or self.policy.dirty:
            self._policy(jobs)
        elif self.policy.sent is not None and not self.policy.in_flight:
            jobs.append(m.CheckPolicy(self.policy.sent))

    def _workload_routes(self) -> KernelBatch:
        return self.desired.replace("workloads", self.workloads.routes())

    def _request_resync(self, jobs: list[m.Job]) -> None:
        """The whole desired set goes behind every batch already sent (see writer)."""
        if self.resync_pending:
            return
        self.resync_pending = True
        jobs.append(m.Resync(self.desired.effective(), self.desired.kept()))

    def _on_applied(self, applied: Applied) -> None:
        self.applies_in_flight = max(0, self.applies_in_flight - 1)
        stats = self.kernel
        stats.applied += applied.count
        stats.failures += len(applied.failures)
        stats.last_apply_seconds = applied.seconds
        stats.apply_seconds_total += applied.seconds
        self._record_failures(applied.failures)

    def _on_resynced(self, resynced: Resynced) -> None:
        self.resync_pending = False
        # Repairs prompted by route events wait this long after the last one (60,000
        # routes added by hand once caused 875 full resyncs in a few seconds).
        self.event_resync_after = self.clock.monotonic() + max(EVENT_RESYNC_GAP,
                                                               20 * resynced.seconds)
        self.applies_in_flight = 0  # ApplyRoutes jobs the writer has not reported yet
        stats = self.kernel
        stats.resyncs += 1
        stats.repaired += resynced.repaired
        stats.failures += len(resynced.failures)
        stats.last_resync_seconds = resynced.seconds
        self.drift.extend(resynced.drift)
        self._record_failures(resynced.failures)
        # A resync rewrote every differing route: those without a failure are fine now.
        refused = {f.route.prefix for f in resynced.failures}
        self.failed = {p: e for p, e in self.failed.items()
                       if p in refused or self.desired.wanted(p) is not None}

    def _record_failures(self, failures: Iterable[Any]) -> None:
        for failure in failures:
            self.failed[failure.route.prefix] = str(failure)

    def _on_route_event(self, event: RouteEvent, jobs: list[m.Job]) -> None:
        """Somebody else touched a route of ours: repair it if it matters."""
        prefix = event.route.prefix
        wanted = self.desired.wanted(prefix)
        if event.deleted:
            differs = wanted is not None
        else:
            differs = wanted != event.route and prefix not in self.desired.kept()
        if not differs:
            return
        now = self.clock.monotonic()
        if now >= self.event_resync_after:
            self.log.info("route changed outside the agent", prefix=str(prefix),
                          deleted=event.deleted)
            self._request_resync(jobs)
        else:  # a flood of foreign changes: one repair when the gap is over, not one each
            self.due["resync"] = min(self.due["resync"], self.event_resync_after)

    # -- jobs --------------------------------------------------------------------------
    def _on_job_done(self, done: m.JobDone, jobs: list[m.Job]) -> None:
        if done.error:
            self.counters.etcd_errors += done.kind in ("register", "liveness", "gc", "orphan")
        if done.kind == "register":
            self.registration.in_flight = False
            self.registration.last_error = done.error
            self.registration.registered = not done.error
        elif done.kind == "liveness":
            if done.error:
                self.registration.last_error = done.error
            else:
                self.registration.last_refresh = self.clock.time()
                self.registration.ttl = int(done.result.get("ttl", 0))
                self.registration.last_error = ""
        elif done.kind == "gc" and not done.error:
            self.counters.gc_runs += 1
            self.counters.gc_released += int(done.result.get("released", 0))
        elif done.kind == "orphan":
            name = str(done.result.get("link", ""))
            outcome = "kept" if done.error else str(done.result.get("outcome", "kept"))
            self.workloads.resolved(name, outcome)
            self.counters.orphans_restored += outcome == "restored"
            self.counters.orphans_removed += outcome == "removed"
            self.counters.orphans_adopted += outcome == "adopted"
        elif done.kind == "gone":
            handle = str(done.result.get("handle", ""))
            if done.error or not done.result.get("released"):
                self.workloads.release_failed(handle)
            else:
                self.counters.gone_released += 1
        elif done.kind == "restore-block":
            if done.result.get("restored"):
                self.counters.blocks_restored += 1
            else:  # failed, or a record exists now: the next snapshot decides again
                self.restoring_blocks.discard(str(done.result.get("cidr", "")))
        elif done.kind == "host":
            repaired = list(done.result.get("repaired", ()))
            if repaired:
                self.log.warning("host settings changed outside the agent; put back",
                                 repaired=repaired)
                self.counters.host_repairs += len(repaired)
                self.last_host_repair = f"{', '.join(repaired)} (at {self.clock.time():.0f})"
            if done.error:
                self.log.warning("could not check host settings", error=done.error)
        elif done.kind == "links" and done.error:
            self.log.warning("could not list host links", error=done.error)

    # -- reading (control socket, metrics) ---------------------------------------------
    def degraded(self) -> list[str]:
        """What keeps this node from doing its job though every thread runs: shown by
        `node status` and the health metric; restarting the agent would not fix it."""
        found = []
        info, now = self.speaker, self.clock.monotonic()
        if self.speaker_live and info.down_since is not None and \
                now - info.down_since > SPEAKER_GRACE:
            what = "ExaBGP's API not connected" if info.running else "ExaBGP not running"
            found.append(f"{what} for {now - info.down_since:.0f}s ({info.restarts} "
                         "restart(s)" + (f"; last restarted because {info.last_restart_reason}"
                                         if info.last_restart_reason else "") + ")")
        recent = [t for t in info.exits if now - t < CRASH_LOOP_WINDOW]
        stable = info.connected and info.connected_since is not None and \
            now - info.connected_since >= SPEAKER_GRACE
        if len(recent) >= CRASH_LOOP_EXITS and not stable:
            found.append(f"ExaBGP exited {len(recent)} times in the last "
                         f"{CRASH_LOOP_WINDOW / 60:.0f} minutes" +
                         (f" (last restarted because {info.last_restart_reason})"
                          if info.last_restart_reason else "") +
                         "; see exabgp.log in the agent's run directory")
        if self.registration.last_error:
            found.append(f"registration: {self.registration.last_error}")
        for cidr, why in sorted(self.routing.refused_blocks.items()):
            found.append(f"own block {cidr} not routed: {why}")
        for key, why in sorted(self.policy.refused.items()):
            found.append(f"network policy record does not parse: {key}: {why}")
        ignored = self.ignored_records()
        if ignored:
            key, why = next(iter(sorted(ignored.items())))
            more = f" and {len(ignored) - 1} more" if len(ignored) > 1 else ""
            found.append(f"etcd record ignored: {key}: {why}{more} (see ignored_records)")
        return found

    def ignored_records(self) -> dict[str, str]:
        return {k: why for records in self.ignored.values() for k, why in records.items()}

    def status(self) -> dict[str, Any]:
        routing = self.routing
        peers = []
        for address in sorted(routing.sessions):
            session = routing.sessions[address]
            counts = routing.rib.counts(address)
            ours = sum(1 for p in routing.exports if (":" in p) == (":" in address))
            advertised = ours + len(self.announcer.reflected.get(address, {}))
            peers.append({
                "address": address, "name": session.peer.name, "kind": session.peer.kind,
                "asn": session.peer.asn, "family": f"ipv{session.peer.family}",
                "state": session.state, "since": session.since,
                "received": counts["received"], "accepted": counts["accepted"],
                "rejected": counts["rejected"],
                "advertised": advertised if session.established else 0,
                "last_error": session.last_error, "graceful_restart": session.restart_time,
                "stale_until": self._wall(session.stale_until), "flaps": session.flaps,
                "rejected_by_reason": dict(session.rejected),
            })
        speaker = self.speaker
        registration = self.registration
        return {
            "node": routing.me.name, "address": routing.me.address,
            "address6": routing.me.ipv6 or None, "router_id": routing.me.bgp_id,
            "asn": routing.me.asn,
            "route_reflector": routing.me.rr_cluster_id, "peers": peers,
            "exports": sorted(routing.exports), "refused_blocks": dict(routing.refused_blocks),
            "stale_released": routing.stale_released,
            "stale_routes": len(self.desired.kept()),
            "registration": {"healthy": registration.registered and not registration.last_error,
                             "registered": registration.registered,
                             "last_refresh": registration.last_refresh,
                             "ttl": registration.ttl, "last_error": registration.last_error},
            "bgp_process": {"running": speaker.running, "connected": speaker.connected,
                            "pid": speaker.pid, "started_at": speaker.started_at,
                            "restarts": speaker.restarts, "reloads": speaker.reloads,
                            "reloads_refused": speaker.reloads_refused,
                            "api_errors": speaker.api_errors,
                            "last_restart_reason": speaker.last_restart_reason},
            "degraded": self.degraded(),
            "ignored_records": self.ignored_records(),
            "last_host_repair": self.last_host_repair,
            "kernel": dict(self.kernel.__dict__),
            "route_kinds": dict(collections.Counter(
                r.kind for r in self.desired.effective().values())),
            "unregistered_links": dict(self.workloads.unresolved),
            "policy": self.policy.status(),
            "counters": dict(self.counters.__dict__),
        }

    def _wall(self, deadline: float | None) -> float | None:
        """A monotonic deadline as wall-clock time, for people."""
        if deadline is None:
            return None
        return self.clock.time() + (deadline - self.clock.monotonic())

    def bgp_routes(self, peer: str | None, which: str) -> list[dict[str, Any]]:
        routing = self.routing
        if which == "advertised":
            rows: list[dict[str, Any]] = []
            for address in [peer] if peer else sorted(routing.sessions):
                session = routing.sessions.get(address)
                if session is None or not session.established:
                    continue
                family = 6 if ":" in address else 4
                rows += [{"prefix": exported, "peer": address,
                          "next_hop": routing.me.address_of(family), "as_path": [],
                          "origin": "local"}
                         for exported in sorted(routing.exports)
                         if (":" in exported) == (family == 6)]
                rows += [{"prefix": r.prefix, "peer": address, "next_hop": r.next_hop,
                          "as_path": list(r.as_path), "origin": "reflected"}
                         for _, r in sorted(self.announcer.reflected.get(address, {}).items())]
            return rows
        rows = []
        for prefix, path in routing.rib.received(peer):
            if which == "rejected" and path.accepted:
                continue
            if which == "accepted" and not path.accepted:
                continue
            rows.append({"prefix": str(prefix), "peer": path.peer, "next_hop": path.next_hop,
                         "as_path": list(path.as_path), "accepted": path.accepted,
                         "reason": path.rejected,
                         "best": path in routing.rib.best(prefix),
                         "stale": path.stale})
        return rows


def _value(parse: Callable[[dict[str, Any]], T]) -> Callable[[str, dict[str, Any]], T]:
    """A record parser that needs only the value, for `_decode`."""
    return lambda _key, value: parse(value)


def borrowed_record(key: str, _value: dict[str, Any]) -> tuple[str, str]:
    """ipam/borrowed/<node>/<address> -> (address, node); ValueError when malformed."""
    node, _, address = key[len(keys.BORROWED):].partition("/")
    if not node:
        raise ValueError(f"{key}: no node in the key")
    return checks.address(address, "borrowed address"), node
