"""The agent's state, driven by hand-made messages on a fake clock: no threads, no I/O.

A fake kernel applies the ApplyRoutes jobs in the order they come out, as the kernel
writer does, so every test can compare "what the kernel would hold" with what the RIB
decided, whatever order the inputs arrived in.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from bgp import api
from fabric.agent import messages as m
from fabric.agent.clock import FakeClock
from fabric.agent.routing import DEPARTURE_GRACE, MAX_PREFIX_HOLD_DOWN, Settings
from fabric.agent.state import EVENT_RESYNC_GAP, MIRRORS, SPEAKER_GRACE, AgentState, Intervals
from fabric.agent.workloads import HostLink
from fabric.kernel.routes import Applied, Resynced, Route, RouteEvent, blackhole, remote
from fabric.model.blocks import Block
from fabric.model.nodes import Node, Workload
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import parse_pool
from fabric.model.prefix import Prefix
from fabric.store import keys

A = Node("a", "192.0.2.1", 64512)
B = Node("b", "192.0.2.2", 64512)
C = Node("c", "192.0.2.3", 64512)
POOL = parse_pool("p", "10.244.0.0/16")
P = Prefix.parse


class Fabric:
    """An AgentState with the etcd records it was fed, a fake kernel and the jobs."""

    def __init__(self, me: Node = A, *, max_prefixes: int = 5, graceful_restart: int = 120,
                 nodes: tuple[Node, ...] = (A, B, C),
                 taken_over: dict[Prefix, Route] | None = None) -> None:
        self.clock = FakeClock()
        self.state = AgentState(me, self.clock, Settings(9, graceful_restart, False,
                                                         max_prefixes, None),
                                Intervals(resync=10, links=10, gc=60, gc_first=30,
                                          liveness=5))
        self.kernel: dict[Prefix, Route] = dict(taken_over or {})
        self.state.desired.take_over(self.kernel)  # what a previous run left
        self.jobs: list[m.Job] = []
        self.records: dict[str, dict[str, dict]] = {name: {} for name in MIRRORS}
        self.snapshot("nodes", {n.name: n.to_record() for n in nodes})
        self.snapshot("pools", {"p": POOL.to_record()})
        self.snapshot("blocks", {c: Block(c, "p", o).to_record() for c, o in
                                 (("10.244.0.0/26", "a"), ("10.244.0.64/26", "b"))})
        for name in ("borrowed", "bgp-config", "bgp-peers", "workloads"):
            self.snapshot(name, {})
        self.config = self.state.initial_config()
        self.jobs.clear()

    def snapshot(self, name: str, records: dict[str, dict]) -> None:
        self.records[name] = records
        self.send(m.Snapshot(name, dict(records)))

    def send(self, message: object) -> list[m.Job]:
        return self._run(self.state.handle(message))

    def tick(self) -> list[m.Job]:
        return self._run(self.state.tick())

    def _run(self, jobs: list[m.Job]) -> list[m.Job]:
        for job in jobs:
            if isinstance(job, m.ApplyRoutes):
                for prefix in job.delete:
                    self.kernel.pop(prefix, None)
                for route in job.replace:
                    self.kernel[route.prefix] = route
                if job.reply is not None:
                    job.reply.set_result([])
                assert self.state.handle(Applied(len(job.replace) + len(job.delete), (),
                                                 0.0)) == []
        self.jobs += jobs
        return jobs

    def event(self, event: api.Event) -> list[m.Job]:
        return self.send(m.BgpEvent(self.state.speaker.generation, event))

    def up(self, peer: str, restart: int | None = 120) -> list[m.Job]:
        self.event(api.Open(peer, restart, 9, peer))
        return self.event(api.PeerState(peer, "up"))

    def announce(self, peer: str, *prefixes: str, next_hop: str | None = None,
                 path: tuple[int, ...] = ()) -> list[m.Job]:
        return self.event(api.Update(peer, {next_hop or peer: list(prefixes)}, [],
                                     api.Attributes(as_path=path)))

    def learned(self) -> dict[str, tuple[str, ...]]:
        """What the kernel holds that came from BGP: prefix -> next hops."""
        return {str(p): r.gateways for p, r in self.kernel.items() if r.kind != "workload"
                and r.type != "blackhole"}

    def commands(self) -> list[str]:
        return [c for job in self.jobs if isinstance(job, m.Send) for c in job.commands]

    def configures(self) -> list[m.Configure]:
        return [j for j in self.jobs if isinstance(j, m.Configure)]

    def peer(self, address: str) -> dict:
        return {p["address"]: p for p in self.state.status()["peers"]}[address]


@pytest.fixture
def fab() -> Fabric:
    return Fabric()


# -- etcd in, ExaBGP configuration and kernel out ----------------------------------------
def test_peers_exports_and_blackholes_follow_etcd(fab):
    assert sorted(fab.state.routing.peers) == ["192.0.2.2", "192.0.2.3"]
    assert fab.state.routing.exports == {"10.244.0.0/26"}
    assert fab.kernel == {P("10.244.0.0/26"): blackhole(P("10.244.0.0/26"))}
    assert "neighbor 192.0.2.2 {" in fab.config
    assert "route 10.244.0.0/26 next-hop self;" in fab.config
    fab.snapshot("bgp-peers", {"tor": PeerSpec("tor", "192.0.2.254", 65100).to_record()})
    assert fab.configures()[-1].reload  # the neighbors changed: ExaBGP must reload
    fab.snapshot("bgp-config", {"c": BgpConfig(node_mesh=False).to_record()})
    fab.clock.advance(DEPARTURE_GRACE)
    fab.tick()
    assert list(fab.state.routing.peers) == ["192.0.2.254"]
    assert "neighbor 192.0.2.2 {" not in fab.configures()[-1].config
    fab.jobs.clear()
    fab.snapshot("borrowed", {keys.borrowed("a", "10.244.0.70"): {}})
    assert fab.state.routing.exports == {"10.244.0.0/26", "10.244.0.70/32"}
    # A new route of ours is announced through the API at once, not by a reload.
    assert fab.commands() == ["announce attributes next-hop self nlri 10.244.0.70/32"]
    assert not any(c.reload for c in fab.configures())
    assert "route 10.244.0.70/32 next-hop self;" in fab.configures()[-1].config
    fab.jobs.clear()
    fab.snapshot("borrowed", {})
    assert fab.commands() == ["withdraw attributes next-hop self nlri 10.244.0.70/32"]


def test_accepted_routes_reach_the_kernel_rejected_do_not(fab):
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26", "0.0.0.0/0", "10.244.0.0/26")
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}
    assert fab.peer("192.0.2.2")["rejected_by_reason"] == {"default-route": 1, "own-block": 1}
    fab.event(api.Update("192.0.2.2", {}, ["10.244.0.64/26"]))
    assert fab.learned() == {}


def test_our_own_block_covering_an_underlay_address_is_neither_routed_nor_announced():
    fab = Fabric()
    fab.snapshot("blocks", {**fab.records["blocks"],
                            "x": Block("192.0.2.0/26", "p", "a").to_record()})
    assert "192.0.2.0/26" not in fab.state.routing.exports
    assert P("192.0.2.0/26") not in fab.kernel  # no blackhole over our own peers
    assert "192.0.2.0/26" in fab.state.status()["refused_blocks"]


# -- adversarial orders: a policy change and an UPDATE for the same prefix ---------------
CLAIM = {"10.244.0.128/26": Block("10.244.0.128/26", "p", "c").to_record()}


def _claim(fab: Fabric) -> None:
    fab.snapshot("blocks", {**fab.records["blocks"], **CLAIM})


@pytest.mark.parametrize("order", ["claim-then-update", "update-then-claim"])
def test_a_rejected_route_never_stays_in_the_kernel(order):
    """c's block arrives from b with b as next hop: once etcd says the block is c's,
    that is a next-hop mismatch, whichever came first."""
    fab = Fabric()
    fab.up("192.0.2.2")
    steps = [lambda: _claim(fab),
             lambda: fab.announce("192.0.2.2", "10.244.0.128/26")]
    for step in steps if order == "claim-then-update" else reversed(steps):
        step()
    assert fab.learned() == {}
    assert fab.state.desired.source("learned") == {}
    rows = fab.state.bgp_routes(None, "rejected")
    assert [(r["prefix"], r["reason"]) for r in rows] == [
        ("10.244.0.128/26", "next-hop-mismatch")]


@pytest.mark.parametrize("order", ["withdraw-then-claim", "claim-then-withdraw"])
def test_the_kernel_follows_the_last_decision_in_both_orders(order):
    fab = Fabric()
    fab.up("192.0.2.3")
    fab.announce("192.0.2.3", "10.244.0.128/26")
    assert fab.learned() == {"10.244.0.128/26": ("192.0.2.3",)}
    steps = [lambda: fab.event(api.Update("192.0.2.3", {}, ["10.244.0.128/26"])),
             lambda: _claim(fab)]
    for step in steps if order == "withdraw-then-claim" else reversed(steps):
        step()
    assert fab.learned() == {}


def test_kernel_jobs_come_out_in_decision_order(fab):
    """Announce, then withdraw: the fake kernel applies the jobs in order, and a
    reordering would leave the route installed."""
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.event(api.Update("192.0.2.2", {}, ["10.244.0.64/26"]))
    applies = [j for j in fab.jobs if isinstance(j, m.ApplyRoutes) and
               (P("10.244.0.64/26") in j.delete or
                any(r.prefix == P("10.244.0.64/26") for r in j.replace))]
    assert [bool(j.replace) for j in applies] == [True, False]
    assert fab.learned() == {}


# -- graceful restart, End-of-RIB, timers on the fake clock ------------------------------
def test_silent_loss_keeps_routes_stale_until_end_of_rib(fab):
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.event(api.PeerState("192.0.2.2", "down", "closing connection"))
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}
    [row] = fab.state.bgp_routes("192.0.2.2", "received")
    assert row["stale"] and row["best"]  # what forwards is the stale path: shown as best
    fab.up("192.0.2.2")
    fab.event(api.EndOfRib("192.0.2.2", "ipv4 unicast"))  # not sent again: swept
    assert fab.learned() == {}


def test_a_notification_drops_routes_at_once(fab):
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.event(api.PeerState("192.0.2.2", "down", "notification sent (4,0)"))
    assert fab.learned() == {}
    assert fab.peer("192.0.2.2")["last_error"] == "notification sent (4,0) Hold Timer Expired"


def test_restart_time_expiry_sweeps_stale_routes(fab):
    fab.up("192.0.2.2", restart=30)
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.event(api.PeerState("192.0.2.2", "down", "closing connection"))
    fab.clock.advance(29)
    fab.tick()
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}
    assert fab.state.next_deadline() <= fab.clock.monotonic() + 1
    fab.clock.advance(1)
    fab.tick()
    assert fab.learned() == {}


def test_max_prefix_holds_down_then_readmits(fab):
    fab.up("192.0.2.3")
    fab.announce("192.0.2.3", "10.244.1.0/26")
    fab.announce("192.0.2.3", *(f"10.244.{2 + i}.0/26" for i in range(6)))
    assert fab.learned() == {}
    assert "neighbor 192.0.2.3 teardown 1" in fab.commands()
    assert "max-prefix 5 exceeded" in fab.peer("192.0.2.3")["last_error"]
    held = fab.configures()[-1]
    assert held.reload and "neighbor 192.0.2.3 {" not in held.config
    fab.announce("192.0.2.3", "10.244.1.0/26")  # ignored while held down
    assert fab.learned() == {}
    fab.jobs.clear()
    fab.clock.advance(MAX_PREFIX_HOLD_DOWN - 1)
    fab.tick()
    assert fab.configures() == []
    fab.clock.advance(1)
    fab.tick()
    back = fab.configures()[-1]
    assert back.reload and "neighbor 192.0.2.3 {" in back.config
    fab.up("192.0.2.3")
    fab.announce("192.0.2.3", "10.244.1.0/26")
    assert fab.learned() == {"10.244.1.0/26": ("192.0.2.3",)}


def test_taken_over_routes_stay_until_peers_confirm():
    old = {P("10.244.0.64/26"): remote(P("10.244.0.64/26"), ["192.0.2.2"]),
           P("10.244.9.0/26"): remote(P("10.244.9.0/26"), ["192.0.2.2"])}
    fab = Fabric(nodes=(A, B), taken_over=old)
    assert set(old) <= set(fab.kernel) and fab.state.status()["stale_routes"] == 2
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    assert set(old) <= set(fab.kernel)  # not confirmed yet: both kept
    fab.event(api.EndOfRib("192.0.2.2", "ipv4 unicast"))  # every peer confirmed
    assert P("10.244.0.64/26") in fab.kernel and P("10.244.9.0/26") not in fab.kernel
    assert fab.state.routing.stale_released


def test_taken_over_routes_go_after_our_restart_time_without_peers():
    clock = FakeClock()
    state = AgentState(A, clock, Settings(graceful_restart=120), Intervals())
    state.desired.take_over([P("10.244.9.0/26")])
    jobs = state.handle(m.Snapshot("nodes", {"a": A.to_record()}))
    clock.advance(119)
    jobs += state.tick()
    assert not any(isinstance(j, m.ApplyRoutes) and j.delete for j in jobs)
    clock.advance(1)
    jobs = state.tick()
    assert [j.delete for j in jobs if isinstance(j, m.ApplyRoutes)] == [(P("10.244.9.0/26"),)]


def test_periodic_jobs_come_on_time():
    clock = FakeClock()
    state = AgentState(A, clock, Settings(), Intervals(resync=10, links=10, gc=60,
                                                       gc_first=30, liveness=5))
    first = state.tick()
    assert {type(j) for j in first} == {m.Resync, m.ListLinks}
    clock.advance(5)
    assert [type(j) for j in state.tick()] == [m.RefreshLiveness]
    clock.advance(25)
    kinds = [type(j) for j in state.tick()]
    assert m.CollectGarbage in kinds and m.RefreshLiveness in kinds
    assert m.Resync not in kinds  # the first resync has not reported back: not stacked


def test_the_periodic_resync_waits_while_the_writer_is_busy():
    clock = FakeClock()
    state = AgentState(A, clock, Settings(), Intervals(resync=10))
    assert any(isinstance(j, m.Resync) for j in state.tick())
    state.handle(Resynced((), 0, (), 0.5))  # a big table: half a second to read back
    jobs = state.handle(m.Attach("c1.eth0", ("10.244.0.5",), "l3f0", 3, Future()))
    assert state.applies_in_flight == len([j for j in jobs if isinstance(j, m.ApplyRoutes)])
    clock.advance(10)
    assert not any(isinstance(j, m.Resync) for j in state.tick())  # the bulk goes first
    state.handle(Applied(1, (), 0.0))
    clock.advance(1)
    assert any(isinstance(j, m.Resync) for j in state.tick())
    state.handle(Resynced((), 0, (), 0.5))
    clock.advance(10)  # 50 x 0.5 s: the next one is 25 s away, not 10
    assert not any(isinstance(j, m.Resync) for j in state.tick())
    clock.advance(15)
    assert any(isinstance(j, m.Resync) for j in state.tick())


# -- the kernel reports back -------------------------------------------------------------
def test_a_route_changed_by_someone_else_asks_for_one_resync(fab):
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.tick()  # the start-up resync
    fab.send(Resynced((), 0, (), 0.0))
    fab.clock.advance(EVENT_RESYNC_GAP)
    route = fab.kernel[P("10.244.0.64/26")]
    first = fab.send(RouteEvent(True, route))
    second = fab.send(RouteEvent(True, route))
    assert [type(j) for j in first] == [m.Resync] and second == []
    resync = first[0]
    assert resync.desired[P("10.244.0.64/26")] == route
    unrelated = fab.send(RouteEvent(False, remote(P("10.9.0.0/16"), ["192.0.2.9"])))
    assert unrelated == []  # already pending; and the next resync removes it anyway


def test_a_flood_of_foreign_route_changes_costs_one_resync_per_gap(fab):
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.tick()
    fab.send(Resynced((), 0, (), 0.2))  # that resync took 0.2 s: the gap is 4 s
    route = fab.kernel[P("10.244.0.64/26")]
    for _ in range(1000):
        assert fab.send(RouteEvent(True, route)) == []
    fab.clock.advance(3.9)
    assert not [j for j in fab.tick() if isinstance(j, m.Resync)]
    fab.clock.advance(0.2)
    assert len([j for j in fab.tick() if isinstance(j, m.Resync)]) == 1


def test_a_node_record_deleted_and_written_again_costs_no_route(fab):
    """An operator's `etcdctl del`, or an etcd restore, then the node's agent writes its
    record again: its peers must not drop it (and its routes) meanwhile."""
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.jobs.clear()
    fab.snapshot("nodes", {n.name: n.to_record() for n in (A, C)})  # b's record deleted
    fab.clock.advance(DEPARTURE_GRACE - 1)
    fab.tick()
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}
    assert "192.0.2.2" in fab.state.routing.peers and not fab.configures()
    fab.snapshot("nodes", {n.name: n.to_record() for n in (A, B, C)})  # b wrote it again
    fab.clock.advance(60)
    fab.tick()
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}
    assert not any(c.reload for c in fab.configures())  # the session was never touched
    fab.snapshot("nodes", {n.name: n.to_record() for n in (A, C)})  # b removed for good
    fab.clock.advance(DEPARTURE_GRACE)
    fab.tick()
    assert fab.learned() == {} and "192.0.2.2" not in fab.state.routing.peers


# -- registration ------------------------------------------------------------------------
def test_a_deleted_node_record_is_written_again_once(fab):
    fab.jobs.clear()
    fab.snapshot("nodes", {n.name: n.to_record() for n in (B, C)})
    assert [type(j) for j in fab.jobs if isinstance(j, m.RegisterNode)] == [m.RegisterNode]
    fab.jobs.clear()
    fab.snapshot("nodes", {n.name: n.to_record() for n in (B,)})  # still in flight
    assert not any(isinstance(j, m.RegisterNode) for j in fab.jobs)
    fab.send(m.JobDone("register"))
    fab.snapshot("nodes", {n.name: n.to_record() for n in (A, B, C)})
    assert fab.state.status()["registration"]["healthy"]


def test_a_failed_liveness_refresh_shows_in_status(fab):
    fab.send(m.JobDone("liveness", error="etcd at http://x is unreachable"))
    registration = fab.state.status()["registration"]
    assert not registration["healthy"] and "unreachable" in registration["last_error"]
    fab.send(m.JobDone("liveness", result={"ttl": 20}))
    assert fab.state.status()["registration"]["healthy"]


# -- workloads ---------------------------------------------------------------------------
def workload(handle: str, ip: str, link: str) -> Workload:
    return Workload(handle, "a", handle.split(".")[0], "eth0", "/run/netns/x", (ip,),
                    host_ifname=link)


def test_attach_installs_before_replying_and_a_lagging_mirror_does_not_undo_a_detach(fab):
    reply: Future = Future()
    fab.send(m.Attach("c1.eth0", ("10.244.0.5",), "l3f000000000001", 7, reply))
    assert reply.result(0) == []
    assert fab.kernel[P("10.244.0.5/32")].oif == 7
    done: Future = Future()
    fab.send(m.Detach("c1.eth0", ("10.244.0.5",), "l3f000000000001", done))
    assert done.result(0) == [] and P("10.244.0.5/32") not in fab.kernel
    # The mirror still shows the registration the DEL just removed: no route back.
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    fab.send(m.LinksListed((HostLink("l3f000000000001", 7, False),)))
    assert P("10.244.0.5/32") not in fab.kernel


def test_a_lost_registration_does_not_cut_off_a_live_workload(fab):
    reply: Future = Future()
    fab.send(m.Attach("c1.eth0", ("10.244.0.5",), "l3f000000000001", 7, reply))
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    fab.snapshot("workloads", {})  # deleted behind our back (or an old backup restored)
    fab.send(m.LinksListed((HostLink("l3f000000000001", 7, True),)))
    assert P("10.244.0.5/32") in fab.kernel  # the container lives: its route stays


def test_a_registration_lost_after_a_restart_keeps_the_route_and_is_restored(fab):
    """No CNI ADD in this agent's life: only etcd knew the workload, and its record is
    deleted. The route stays while the link lives; the link is resolved (restored)."""
    link = (HostLink("l3f000000000001", 7, True),)
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    fab.send(m.LinksListed(link))
    fab.snapshot("workloads", {})
    assert P("10.244.0.5/32") in fab.kernel
    fab.send(m.LinksListed(link))
    jobs = fab.send(m.LinksListed(link))
    assert [j.link.name for j in jobs if isinstance(j, m.ResolveOrphan)] == ["l3f000000000001"]
    assert P("10.244.0.5/32") in fab.kernel
    fab.send(m.LinksListed(()))  # the container and its link are gone
    assert P("10.244.0.5/32") not in fab.kernel


def test_unexplained_links_are_resolved_after_two_listings(fab):
    listing = (HostLink("l3fdeadbeef0001", 9, True),)
    assert not any(isinstance(j, m.ResolveOrphan) for j in fab.send(m.LinksListed(listing)))
    jobs = fab.send(m.LinksListed(listing))
    assert [j.link.name for j in jobs if isinstance(j, m.ResolveOrphan)] == ["l3fdeadbeef0001"]
    fab.send(m.JobDone("orphan", result={"link": "l3fdeadbeef0001", "outcome": "kept"}))
    assert "l3fdeadbeef0001" in fab.state.status()["unregistered_links"]
    assert not any(isinstance(j, m.ResolveOrphan) for j in fab.send(m.LinksListed(listing)))


def test_registered_workloads_are_routed_after_a_restart(fab):
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    assert P("10.244.0.5/32") not in fab.kernel  # where is it? not listed yet
    fab.send(m.LinksListed((HostLink("l3f000000000001", 7, True),)))
    assert fab.kernel[P("10.244.0.5/32")].oif == 7
    assert fab.state.dns_names == {}  # no name given


# -- ExaBGP ------------------------------------------------------------------------------
def test_a_session_that_comes_up_is_sent_everything_it_should_have(fab):
    jobs = fab.up("192.0.2.2")
    sent = [c for j in jobs if isinstance(j, m.Send) for c in j.commands]
    assert sent == ["neighbor 192.0.2.2 announce attributes next-hop self nlri 10.244.0.0/26"]


def test_exabgp_exiting_is_a_silent_loss_for_every_session(fab):
    fab.send(m.SpeakerStatus(1, "started", pid=10))
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.send(m.SpeakerStatus(1, "exited", code=-9))
    assert fab.peer("192.0.2.2")["state"] == "Idle"
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}  # kept, stale
    assert fab.state.status()["bgp_process"]["restarts"] == 1
    # Events of the dead process that were still queued are ignored.
    fab.send(m.SpeakerStatus(2, "started", pid=11))
    fab.send(m.BgpEvent(1, api.Update("192.0.2.2", {}, ["10.244.0.64/26"])))
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}


def test_a_route_reflector_passes_client_routes_to_other_clients_incrementally():
    rr = Node("rr", "192.0.2.9", 64512, rr_cluster_id="1.1.1.1")
    fab = Fabric(rr, max_prefixes=100, nodes=(rr, B, C))
    fab.up("192.0.2.2")
    fab.jobs.clear()
    fab.announce("192.0.2.2", "10.244.0.64/26")
    assert fab.commands() == [
        "neighbor 192.0.2.3 announce attributes next-hop 192.0.2.2 "
        "originator-id 192.0.2.2 cluster-list [ 1.1.1.1 ] nlri 10.244.0.64/26"]
    assert not fab.configures()  # reflection never re-renders the configuration
    fab.jobs.clear()
    fab.event(api.Update("192.0.2.2", {}, ["10.244.0.64/26"]))
    assert fab.commands() == [
        "neighbor 192.0.2.3 withdraw attributes next-hop self nlri 10.244.0.64/26"]
    fab.announce("192.0.2.2", "10.244.0.64/26")
    fab.jobs.clear()
    jobs = fab.up("192.0.2.3")  # a client (re)connects: it gets everything again
    sent = [c for j in jobs if isinstance(j, m.Send) for c in j.commands]
    assert any(c.endswith("nlri 10.244.0.64/26") and "announce" in c for c in sent)


def _wire(sender: Fabric, receiver: Fabric, receiver_address: str) -> int:
    """Deliver `sender`'s reflection commands meant for `receiver` as UPDATEs, as
    ExaBGP would put them on the wire; returns how many were delivered."""
    delivered = 0
    source = sender.state.routing.me.ipv4
    for command in sender.commands():
        words = command.split()
        if words[:2] != ["neighbor", receiver_address]:
            continue
        delivered += 1
        prefixes = words[words.index("nlri") + 1:]
        if words[2] == "withdraw":
            receiver.event(api.Update(source, {}, prefixes))
            continue
        next_hop = words[words.index("next-hop") + 1]
        originator = words[words.index("originator-id") + 1]
        start = words.index("cluster-list") + 2
        clusters = tuple(words[start:words.index("]", start)])
        receiver.event(api.Update(source, {next_hop: prefixes}, [], api.Attributes(
            originator_id=originator, cluster_list=clusters)))
    sender.jobs.clear()
    return delivered


def test_two_reflectors_agree_on_a_clients_route_instead_of_trading_it_forever():
    # The client's address is above both reflectors': ranked by peer address alone,
    # each reflector preferred its twin's copy and the two traded the route forever.
    r1 = Node("r1", "192.0.2.11", 64512, rr_cluster_id="10.255.0.1")
    r2 = Node("r2", "192.0.2.12", 64512, rr_cluster_id="10.255.0.2")
    client = Node("c", "192.0.2.15", 64512)
    nodes = (r1, r2, client)
    rrs = {r1.ipv4: Fabric(r1, max_prefixes=100, nodes=nodes),
           r2.ipv4: Fabric(r2, max_prefixes=100, nodes=nodes)}
    block = "10.244.0.128/26"
    for fab in rrs.values():
        fab.snapshot("blocks", {block: Block(block, "p", "c").to_record()})
        for peer in (client.ipv4, *[a for a in rrs if a != fab.state.routing.me.ipv4]):
            fab.up(peer)
        fab.jobs.clear()
        fab.announce(client.ipv4, block)  # the client's session to each reflector
    rounds = 0
    while _wire(rrs[r1.ipv4], rrs[r2.ipv4], r2.ipv4) + \
            _wire(rrs[r2.ipv4], rrs[r1.ipv4], r1.ipv4):
        rounds += 1
        assert rounds < 10, "the reflectors keep sending each other the client's route"
    for fab in rrs.values():
        best = fab.state.routing.rib.best(P(block))
        assert [p.peer for p in best] == [client.ipv4]  # the copy heard directly
        assert fab.learned() == {block: (client.ipv4,)}


def test_a_reflected_route_through_our_cluster_or_from_us_is_refused():
    rr = Node("rr", "192.0.2.9", 64512, rr_cluster_id="10.255.0.9")
    fab = Fabric(rr, max_prefixes=100, nodes=(rr, B, C))
    fab.up("192.0.2.2")
    fab.event(api.Update("192.0.2.2", {"192.0.2.2": ["10.244.0.64/26"]}, [], api.Attributes(
        originator_id="192.0.2.2", cluster_list=("10.255.0.7", "10.255.0.9"))))
    assert fab.learned() == {}
    assert fab.peer("192.0.2.2")["rejected_by_reason"] == {"cluster-list-loop": 1}
    fab.event(api.Update("192.0.2.2", {"192.0.2.2": ["10.244.0.64/26"]}, [], api.Attributes(
        originator_id=rr.bgp_id, cluster_list=("10.255.0.7",))))
    assert fab.learned() == {}
    assert fab.peer("192.0.2.2")["rejected_by_reason"]["originator-is-us"] == 1


def test_reflecting_a_reflected_route_puts_our_cluster_first():
    rr = Node("rr", "192.0.2.9", 64512, rr_cluster_id="10.255.0.9")
    fab = Fabric(rr, max_prefixes=100, nodes=(rr, B, C))
    fab.up("192.0.2.2")
    fab.up("192.0.2.3")
    fab.jobs.clear()
    fab.event(api.Update("192.0.2.2", {"192.0.2.2": ["10.244.0.64/26"]}, [], api.Attributes(
        originator_id="192.0.2.2", cluster_list=("10.255.0.7",))))
    assert fab.commands() == [
        "neighbor 192.0.2.3 announce attributes next-hop 192.0.2.2 "
        "originator-id 192.0.2.2 cluster-list [ 10.255.0.9 10.255.0.7 ] nlri 10.244.0.64/26"]


# -- records from etcd that are not usable: ignored, reported, never thrown -------------
def test_a_peer_record_that_is_not_a_peer_is_ignored_and_reported(fab):
    good = PeerSpec("tor", "192.0.2.254", 65000).to_record()
    fab.snapshot("bgp-peers", {keys.bgp_peer("tor"): good,
                               keys.bgp_peer("junk"): {**good, "name": "junk",
                                                       "address": "junk"}})
    assert "192.0.2.254" in fab.state.routing.peers
    assert fab.state.ignored_records() == {
        keys.bgp_peer("junk"): "address 'junk' is not an IP address"}
    assert any("etcd record ignored" in d for d in fab.state.degraded())


@pytest.mark.parametrize("mirror,key,record", [
    ("nodes", keys.node("x"), {"name": "x", "address": "x", "asn": 64512}),
    ("blocks", "/l3fabric/v1/ipam/blocks/10.244.9.0-33",
     {"cidr": "10.244.9.0/33", "pool": "p", "affinity": "a"}),
    ("bgp-config", keys.BGP_CONFIG, {"asn": "x"}),
    ("bgp-config", keys.BGP_CONFIG, {"asn": -1}),
    ("workloads", keys.workload("a", "h.eth0"), {"handle": "h.eth0", "node": "a",
                                                 "container_id": "c", "ifname": "eth0",
                                                 "ips": ["x"]}),
    ("borrowed", keys.BORROWED + "b/junk", {}),
    ("pools", "/l3fabric/v1/ipam/pools/q", {"name": "q", "cidr": "10.0.0.0/33",
                                             "block_size": 26}),
])
def test_no_malformed_record_throws_in_the_owner_loop(fab, mirror, key, record):
    before = dict(fab.records[mirror])
    fab.snapshot(mirror, {**before, key: record})  # raised inside handle() before
    assert key in fab.state.ignored_records()
    fab.snapshot(mirror, before)
    assert key not in fab.state.ignored_records()


def test_a_node_record_gone_bad_keeps_its_last_good_version(fab):
    fab.up("192.0.2.2")
    fab.announce("192.0.2.2", "10.244.0.64/26")
    nodes = dict(fab.records["nodes"])
    fab.snapshot("nodes", {**nodes, keys.node("b"): {"garbage": True}})
    fab.clock.advance(DEPARTURE_GRACE + 1)
    fab.tick()
    assert "192.0.2.2" in fab.state.routing.peers  # not taken for a node that left
    assert fab.learned() == {"10.244.0.64/26": ("192.0.2.2",)}
    fab.send(m.Snapshot("nodes", nodes, {keys.node("c"): "not JSON"}))  # unreadable
    fab.clock.advance(DEPARTURE_GRACE + 1)
    fab.tick()
    assert "192.0.2.3" in fab.state.routing.peers


def test_our_own_record_gone_bad_is_written_again(fab):
    nodes = dict(fab.records["nodes"])
    fab.jobs.clear()
    fab.snapshot("nodes", {**nodes, keys.node("a"): {"name": "a", "address": "junk"}})
    assert [j for j in fab.jobs if isinstance(j, m.RegisterNode)]


def test_a_bgp_config_gone_bad_keeps_the_last_good_one(fab):
    fab.snapshot("bgp-config", {keys.BGP_CONFIG: BgpConfig(64600).to_record()})
    fab.snapshot("bgp-config", {keys.BGP_CONFIG: {"asn": "x"}})
    assert fab.state.routing.view.config.asn == 64600


def test_a_block_over_the_underlay_segment_is_neither_blackholed_nor_accepted():
    """10.99.0.192/26 holds no node address but the segment's gateway and etcd."""
    me = Node("a", "10.99.0.11", 64512, networks=("10.99.0.0/24",))
    other = Node("b", "10.99.0.12", 64512, networks=("10.99.0.0/24",))
    fab = Fabric(me, nodes=(me, other))
    edge = parse_pool("edge", "10.99.0.0/16")
    fab.snapshot("pools", {"p": POOL.to_record(), "edge": edge.to_record()})
    fab.snapshot("blocks", {"10.99.0.192/26": Block("10.99.0.192/26", "edge", "a").to_record(),
                            "10.99.1.0/26": Block("10.99.1.0/26", "edge", "b").to_record()})
    assert P("10.99.0.192/26") not in fab.kernel  # no blackhole over our own segment
    assert "overlaps the underlay network" in fab.state.routing.refused_blocks["10.99.0.192/26"]
    fab.up("10.99.0.12")
    fab.announce("10.99.0.12", "10.99.0.128/26", "10.99.1.0/26")
    assert fab.learned() == {"10.99.1.0/26": ("10.99.0.12",)}


def test_a_workload_whose_link_is_gone_for_the_grace_is_released_once():
    fab = Fabric()
    grace = fab.state.intervals.gone_grace
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    link = (HostLink("l3f000000000001", 7, True),)
    fab.send(m.LinksListed(link))
    assert not [j for j in fab.jobs if isinstance(j, m.ReleaseGone)]
    fab.send(m.LinksListed(()))  # the container's namespace went (a reboot, no DEL)
    fab.clock.advance(grace - 1)
    assert not [j for j in fab.send(m.LinksListed(())) if isinstance(j, m.ReleaseGone)]
    fab.clock.advance(2)
    released = [j for j in fab.send(m.LinksListed(())) if isinstance(j, m.ReleaseGone)]
    assert released == [m.ReleaseGone("c1.eth0", "l3f000000000001")]
    assert not [j for j in fab.send(m.LinksListed(())) if isinstance(j, m.ReleaseGone)]
    fab.send(m.JobDone("gone", result={"handle": "c1.eth0", "released": False}))
    fab.clock.advance(grace + 1)
    fab.send(m.LinksListed(()))
    fab.clock.advance(grace + 1)  # asked again, after a grace of its own
    assert [j for j in fab.send(m.LinksListed(())) if isinstance(j, m.ReleaseGone)]


def test_a_link_back_within_the_grace_is_not_released():
    fab = Fabric()
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    fab.send(m.LinksListed(()))
    fab.clock.advance(fab.state.intervals.gone_grace / 2)
    fab.send(m.LinksListed((HostLink("l3f000000000001", 7, True),)))
    fab.clock.advance(fab.state.intervals.gone_grace)
    assert not [j for j in fab.send(m.LinksListed(())) if isinstance(j, m.ReleaseGone)]


def test_a_block_our_workloads_use_is_restored_when_its_record_goes(fab):
    fab.snapshot("workloads", {"k": workload("c1.eth0", "10.244.0.5",
                                             "l3f000000000001").to_record()})
    blocks = dict(fab.records["blocks"])
    fab.jobs.clear()
    fab.snapshot("blocks", {k: v for k, v in blocks.items() if k != "10.244.0.0/26"})
    assert [j for j in fab.jobs if isinstance(j, m.RestoreBlock)] == [
        m.RestoreBlock("10.244.0.0/26", "p")]
    fab.jobs.clear()
    fab.snapshot("blocks", {k: v for k, v in blocks.items() if k != "10.244.0.0/26"})
    assert not [j for j in fab.jobs if isinstance(j, m.RestoreBlock)]  # once
    fab.snapshot("blocks", blocks)  # restored
    assert not fab.state.restoring_blocks


def test_host_settings_are_checked_on_their_timer_and_repairs_reported(fab):
    fab.jobs.clear()
    fab.clock.advance(fab.state.intervals.host + 0.1)
    assert [j for j in fab.tick() if isinstance(j, m.CheckHost)]
    assert not [j for j in fab.tick() if isinstance(j, m.CheckHost)]  # once per interval
    fab.send(m.JobDone("host", result={"repaired": ["net.ipv4.ip_forward"]}))
    assert "net.ipv4.ip_forward" in fab.state.status()["last_host_repair"]
    assert fab.state.counters.host_repairs == 1


def test_a_deleted_workload_is_not_retained_when_its_registration_goes():
    """A DEL'd handle whose record then vanishes is gone, not `retained` (a vanished
    registration without a DEL of ours): retained, its route would come back on the
    next listing that still shows the doomed link."""
    from fabric.agent.workloads import Workloads
    record = workload("c1.eth0", "10.244.0.5", "l3f000000000001")
    link = HostLink("l3f000000000001", 7, True)
    state = Workloads()
    state.on_registrations([record])
    state.on_links([link])
    assert state.routes()
    state.detach("c1.eth0", "l3f000000000001")
    state.on_registrations([])  # etcd caught up with the DEL
    state.on_links([link])  # the link is reaped after the DEL replied
    assert state.retained == {} and state.routes() == {}
    state.on_registrations([record])  # a registration we did not DEL still is retained
    state.on_registrations([])
    assert "c1.eth0" in state.retained


def test_an_own_block_outside_every_pool_is_not_routed_and_degrades_the_node(fab):
    """Written by hand or left by a deleted pool: peers refuse it (pools bound what a node
    may announce), so it is not ours to announce and `node status` says why."""
    assert fab.state.degraded() == []
    blocks = dict(fab.records["blocks"])
    blocks["10.250.0.0/26"] = Block("10.250.0.0/26", "gone", "a").to_record()
    blocks["10.244.1.0/27"] = Block("10.244.1.0/27", "p", "a").to_record()  # wrong size
    fab.snapshot("blocks", blocks)
    refused = fab.state.routing.refused_blocks
    assert refused == {"10.250.0.0/26": "not a block of any IP pool",
                       "10.244.1.0/27": "not a block of any IP pool"}
    assert P("10.250.0.0/26") not in fab.kernel and P("10.244.0.0/26") in fab.kernel
    assert "10.250.0.0/26" not in fab.state.routing.exports
    assert any("own block 10.250.0.0/26 not routed" in d for d in fab.state.degraded())


def test_exabgp_exiting_again_and_again_is_a_crash_loop_though_each_restart_connects(fab):
    """Each restart connects within the grace, so 'down for N s' never shows: the
    number of exits in the window does, until ExaBGP stays connected for the grace."""
    for generation in range(1, 4):
        fab.send(m.SpeakerStatus(generation, "started", pid=10 + generation))
        fab.send(m.SpeakerStatus(generation, "connected"))
        fab.clock.advance(5)
        assert fab.state.degraded() == []
        fab.send(m.SpeakerStatus(generation, "exited", code=1))
    fab.send(m.SpeakerStatus(4, "started", pid=20))
    fab.send(m.SpeakerStatus(4, "connected"))
    fab.clock.advance(5)
    assert any("ExaBGP exited 3 times" in d for d in fab.state.degraded())
    fab.clock.advance(SPEAKER_GRACE)  # connected for the grace: the loop is over
    assert fab.state.degraded() == []
