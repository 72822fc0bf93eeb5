"""fabric-agent: what runs on every host, and the order it starts and stops things.

The agent's state has one owner, the loop in `fabric.agent.loop`; this module builds
the adapters around it and wires them up:

    etcd mirrors ──Snapshot──►┐                          ┌──► kernel writer (routes)
    ExaBGP speaker ──events──►│                          ├──► ExaBGP speaker (config, API)
    kernel writer ──reports──►├──► owner loop ──jobs──►──┼──► etcd worker (registration, GC)
                              │                          │    (and the nftables table, in
                              │                          │     the writer's same queue)
    job workers ──JobDone────►│   (AgentState)           └──► host worker (links, NAT)
    CNI / control ──requests─►┘

Start: take the run directory's lock and check nobody serves our sockets (a second
agent for the same node must not touch the first one's ExaBGP or routes), reach etcd,
take over the kernel routes a previous run left, register the node, start the loop
and the mirrors, start ExaBGP once the view of etcd is complete (its first
configuration already holds our routes), then serve the CNI plugin, fabricctl, DNS and
metrics. Stop (SIGTERM): stop serving, stop ExaBGP (its sessions close without a
NOTIFICATION, so peers keep our routes for our graceful-restart time), leave the
kernel as it is: the routes keep forwarding until the next agent takes them over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from bgp import speaker as bgp_speaker
from bgp.config import environment
from bgp.speaker import Speaker
from cni.handler import CniHandler
from cni.shim import MAX_REQUEST, decode_request
from cni.spec import DECODE_FAILURE, IO_FAILURE, LATEST, CniError
from fabric import __version__, logs, sockets
from fabric.agent import messages as m
from fabric.agent import metrics
from fabric.agent.clock import Clock, SystemClock
from fabric.agent.config import AgentConfig
from fabric.agent.dns import DnsServer
from fabric.agent.loop import OwnerLoop
from fabric.agent.registration import Registration
from fabric.agent.routing import Settings
from fabric.agent.state import AgentState, Intervals
from fabric.agent.workers import Worker
from fabric.agent.workloads import HostLink
from fabric.kernel import links
from fabric.kernel.nat import OutgoingNat
from fabric.kernel.netlink import RouteSocket
from fabric.kernel.nftables import Nft, NftError, PolicyTable
from fabric.kernel.routes import Failure, kind_of
from fabric.kernel.writer import KernelWriter
from fabric.model.nodes import Node, Workload
from fabric.model.peers import BgpConfig
from fabric.model.prefix import Prefix
from fabric.policy.compiler import PolicyReport
from fabric.store import keys
from fabric.store.datastore import Datastore
from fabric.store.errors import CorruptValue, Unavailable
from fabric.store.registry import Registry
from fabric.store.watch import Mirror
from ipam.allocator import Ipam
from ipam.gc import LeakTracker, collect

ETCD_WAIT = 120.0
READY_WAIT = 60.0  # for every mirror's first listing
STUCK_LOOP = 60.0  # seconds without a beat: the loop is stuck, the agent unhealthy
LEAVE_TIMEOUT = 5.0  # leaving: seconds for ExaBGP to take our withdrawals
LEAVE_SETTLE = 0.5  # and then for its UPDATEs to go out before it is stopped
CONTROL_MAX_REQUEST = 1 << 20  # fabricctl sends a method and a few parameters
MIRRORS = (("pools", keys.POOLS), ("nodes", keys.NODES), ("blocks", keys.BLOCKS),
           ("borrowed", keys.BORROWED), ("bgp-config", keys.BGP_CONFIG),
           ("bgp-peers", keys.BGP_PEERS), ("workloads", keys.WORKLOADS),
           ("policies", keys.POLICIES), ("namespaces", keys.NAMESPACES))


class AgentAlreadyRunning(RuntimeError):
    """Another agent holds this node's run directory or serves its sockets."""


class Agent:
    def __init__(self, config: AgentConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.log = logs.get("agent", node=config.node_name)
        self.started_at = time.time()
        self._threads: dict[str, threading.Thread] = {}
        self._servers: list[Any] = []
        self._mirrors: list[Mirror] = []
        self._lock_fd = -1
        self._stopping = False

    # -- start -------------------------------------------------------------------------
    def start(self) -> None:
        config = self.config
        self._claim()
        self.store = self._connect()
        links.enable_forwarding()
        node = Node(config.node_name, config.address, config.asn or self._fabric_asn(),
                    dict(config.labels), config.rr_cluster_id, time.time(), __version__,
                    config.node_address6 or "", config.router_id or "",
                    tuple(links.connected_networks([config.address,
                                                    config.node_address6 or ""])))
        self.registration = Registration(self.store, node.name, config.lease_ttl)
        self.registration.register(node)
        self.registration.refresh()
        self.speaker = Speaker(config.exabgp_command(), config.run_path,
                               environment(config.node_address, config.node_address6),
                               f"@l3fabric/bgp/{config.node_name}", self._from_speaker)
        self.state = AgentState(
            node, self.clock,
            Settings(config.hold_time, config.graceful_restart, config.ecmp,
                     config.max_prefixes, config.asn),
            Intervals(resync=config.resync_interval, links=config.resync_interval,
                      gc=config.gc_interval, gc_first=min(config.gc_interval, 30.0),
                      liveness=max(1.0, config.lease_ttl / 3), gone_grace=config.gone_grace,
                      host=config.host_check_interval),
            relay_command=tuple(self.speaker.relay_command), nat_outgoing=config.nat_outgoing)
        self.loop = OwnerLoop(self.state, self.clock, self._dispatch)
        self.writer = KernelWriter(config.route_protocol, self.loop.post)
        # The policy table is never flushed at start: the previous run's rules stay in
        # force until the first apply replaces them in one transaction.
        self.policy_table = PolicyTable()
        taken = self.writer.take_over()
        self.state.desired.take_over(r.prefix for r in taken)  # the loop is not running yet
        self.ipam = Ipam(self.store)
        self.registry = Registry(self.store)
        self.nat = OutgoingNat()
        self.leaks = LeakTracker(grace=config.gc_grace)  # the etcd worker's alone
        self.etcd_jobs = Worker("etcd-jobs", self.loop.post)
        self.host_jobs = Worker("host-jobs", self.loop.post)
        self._spawn("owner-loop", self.loop.run)
        for worker in (self.etcd_jobs, self.host_jobs):
            self._threads[worker.name] = worker.start()
        for thread in self.writer.start():
            self._threads[thread.name] = thread
        self._start_mirrors()
        self._wait_ready()
        self._threads["bgp-speaker"] = self.speaker.start(
            self.loop.ask(lambda s: s.initial_config()))
        self._serve()
        self.log.info("agent started", address=config.address, asn=node.asn,
                      routes_taken_over=len(taken))

    def _claim(self) -> None:
        """Be the only agent for this node: lock the run directory, probe our sockets."""
        run = self.config.run_path
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise AgentAlreadyRunning(
                f"another fabric-agent holds {run / 'agent.lock'}; stop it first") from exc
        self._lock_fd = fd
        for name in (self.config.control_socket, self.config.cni_socket):
            if not name.startswith("@"):
                continue  # a path: serve() replaces a stale file; the lock covers it
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.bind(sockets.address(name))
            except OSError as exc:
                raise AgentAlreadyRunning(
                    f"another fabric-agent serves {name} in this network namespace "
                    f"({exc.strerror}); stop it first") from exc
            finally:
                probe.close()

    def _connect(self) -> Datastore:
        deadline = time.monotonic() + ETCD_WAIT
        delay = 0.2
        while True:
            store = Datastore.connect(self.config.etcd)
            try:
                store.ping()
                return store
            except Unavailable as exc:
                store.close()
                if time.monotonic() > deadline or self._stopping:
                    raise
                self.log.warning("waiting for etcd", error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _start_mirrors(self) -> None:
        for name, prefix in MIRRORS:
            mirror = Mirror(self.store, prefix, self.loop.snapshots(name), name)
            self._threads[f"watch-{name}"] = mirror.start()
            self._mirrors.append(mirror)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WAIT
        while not self.loop.ask(lambda s: s.ready):
            if time.monotonic() > deadline:
                missing = self.loop.ask(lambda s: sorted(
                    {n for n, _ in MIRRORS} - s.mirrors_seen))
                raise Unavailable(f"etcd: could not read {', '.join(missing)}")
            time.sleep(0.05)

    def _serve(self) -> None:
        config = self.config
        # DNS and metrics are conveniences: a port taken by another service must not
        # keep the node out of the fabric, so their failure is logged, not fatal.
        self.dns: DnsServer | None = None
        if config.dns_port:
            try:
                self.dns = DnsServer(config.address, config.dns_port, config.dns_domain,
                                     lambda name: self.state.dns_names.get(name, ()))
                self._threads["dns"] = self.dns.start()
            except OSError as exc:
                self.log.error("workload DNS not served; change [dns] port or free it",
                               port=config.dns_port, error=exc.strerror)
        self.metrics: metrics.MetricsServer | None = None
        if config.metrics_port:
            try:
                self.metrics = metrics.MetricsServer("0.0.0.0", config.metrics_port,
                                                     self._collect_metrics)
                self._threads["metrics"] = self.metrics.start()
            except OSError as exc:
                self.log.error("metrics not served; change [metrics] port or free it",
                               port=config.metrics_port, error=exc.strerror)
        dns = {"nameservers": [config.address], "search": [config.dns_domain]} \
            if self.dns else {}
        self.cni = CniHandler(config.node_name, self.ipam, self.registry,
                              LoopRoutes(self.loop), dns=dns)
        self._servers.append(sockets.serve(config.cni_socket, self._serve_cni, "cni",
                                           max_request=MAX_REQUEST))
        self._servers.append(sockets.serve(config.control_socket, self._serve_control,
                                           "control", max_request=CONTROL_MAX_REQUEST))

    def _fabric_asn(self) -> int:
        """The fabric's AS from etcd; the default when the record is missing or bad (the
        owner loop reports a bad one once its mirror reads it)."""
        try:
            entry = self.store.get(keys.BGP_CONFIG)
            return BgpConfig.from_record(entry.value if entry else None).asn
        except (CorruptValue, ValueError, TypeError, OverflowError) as exc:
            self.log.error("bgp configuration in etcd unusable; using the default AS",
                           error=str(exc))
            return BgpConfig().asn

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads[name] = thread

    # -- adapters' reports in, jobs out ------------------------------------------------
    def _from_speaker(self, report: object) -> None:
        """ExaBGP adapter reports, as the owner loop's messages."""
        if isinstance(report, bgp_speaker.Event):
            self.loop.post(m.BgpEvent(report.generation, report.event))
        elif isinstance(report, bgp_speaker.Started):
            self.loop.post(m.SpeakerStatus(report.generation, "started", pid=report.pid))
        elif isinstance(report, bgp_speaker.Connected):
            self.loop.post(m.SpeakerStatus(report.generation, "connected"))
        elif isinstance(report, bgp_speaker.Exited):
            self.loop.post(m.SpeakerStatus(report.generation, "exited", code=report.code))
        elif isinstance(report, bgp_speaker.Restarting):
            self.loop.post(m.SpeakerStatus(report.generation, "restarting",
                                           reason=report.reason))
        elif isinstance(report, bgp_speaker.Reloaded):
            self.loop.post(m.ReloadStatus(report.ok, report.line))

    def _dispatch(self, job: m.Job) -> None:
        """Hand one job to its adapter (called on the owner loop: never blocks)."""
        if isinstance(job, m.ApplyRoutes):
            self.writer.apply(job.replace, job.delete, job.reply, job.guard)
        elif isinstance(job, m.Resync):
            self.writer.resync(job.desired, job.keep)
        elif isinstance(job, m.Configure):
            self.speaker.configure(job.config, job.reload)
        elif isinstance(job, m.Send):
            self.speaker.send(job.commands)
        elif isinstance(job, m.Flush):
            self.speaker.flush(job.done)
        elif isinstance(job, m.RegisterNode):
            self.etcd_jobs.submit("register", lambda: self.registration.register(job.node))
        elif isinstance(job, m.RefreshLiveness):
            self.etcd_jobs.submit("liveness", self.registration.refresh)
        elif isinstance(job, m.CollectGarbage):
            self.etcd_jobs.submit("gc", self._collect_garbage)
        elif isinstance(job, m.ResolveOrphan):
            self.etcd_jobs.submit("orphan", lambda: self._resolve_orphan(job.link))
        elif isinstance(job, m.ReleaseGone):
            self.etcd_jobs.submit("gone", lambda: self._release_gone(job))
        elif isinstance(job, m.RestoreBlock):
            self.etcd_jobs.submit("restore-block", lambda: self._restore_block(job))
        elif isinstance(job, m.CheckHost):
            self.host_jobs.submit("host", self._check_host)
        elif isinstance(job, m.ListLinks):
            self.host_jobs.submit("links", self._list_links)
        elif isinstance(job, m.ApplyNat):
            self.host_jobs.submit("nat", lambda: self._apply_nat(job))
        elif isinstance(job, m.ApplyPolicy):
            self.writer.call(lambda: self._apply_policy(job))
        elif isinstance(job, m.CheckPolicy):
            self.writer.call(lambda: self._check_policy(job))
        else:
            raise TypeError(f"no adapter for {job!r}")

    # -- jobs (each on its worker's thread) --------------------------------------------
    def _collect_garbage(self) -> dict[str, Any]:
        result = collect(self.ipam, self.config.node_name, self.leaks)
        return {"released": len(result.released), "blocks_freed": len(result.blocks_freed)}

    def _release_gone(self, job: m.ReleaseGone) -> dict[str, Any]:
        try:
            released = self.cni.release_gone(job.handle, job.host_ifname)
        except Exception as exc:  # reported back with the handle: asked again later
            self.log.warning("could not release a gone workload", handle=job.handle,
                             error=str(exc))
            return {"handle": job.handle, "released": False, "error": str(exc)}
        return {"handle": job.handle, "released": released}

    def _restore_block(self, job: m.RestoreBlock) -> dict[str, Any]:
        try:
            restored = self.ipam.restore_block(job.cidr, job.pool, self.config.node_name)
        except Exception as exc:
            self.log.warning("could not restore a block record", block=job.cidr,
                             error=str(exc))
            return {"cidr": job.cidr, "restored": False, "error": str(exc)}
        return {"cidr": job.cidr, "restored": restored}

    def _check_host(self) -> dict[str, Any]:
        repaired = links.enable_forwarding()
        if self.config.nat_outgoing:
            repaired += self.nat.verify()
        return {"repaired": repaired}

    def _list_links(self) -> None:
        found = tuple(HostLink(n, i, up) for n, i, up in links.host_link_states())
        self.loop.post(m.LinksListed(found))

    def _apply_policy(self, job: m.ApplyPolicy) -> None:
        """On the kernel writer's thread, in order with the route batches."""
        try:
            if job.rules is not None:
                report = self.policy_table.apply(job.rules, job.full)
            else:
                if self.policy_table.applied is None:  # an ADD before the first apply:
                    self.policy_table.guard()  # no forged sources, whatever else holds
                report = PolicyReport(True)
        except Exception as exc:  # libnftables missing, or worse: fail the ADD, not the agent
            self.log.exception("network policy apply failed")
            report = PolicyReport(False, error=str(exc) or type(exc).__name__)
        if job.reply is not None and not job.reply.done():
            job.reply.set_result(report)
        if not report.ok:
            self.log.error("network policy not applied", error=report.error)
        if job.rules is not None:
            self.loop.post(m.PolicyDone(report))

    def _check_policy(self, job: m.CheckPolicy) -> None:
        try:
            report = self.policy_table.check(job.rules)
        except Exception as exc:
            report = PolicyReport(False, error=str(exc) or type(exc).__name__)
        self.loop.post(m.PolicyDone(report, check=True))

    def _apply_nat(self, job: m.ApplyNat) -> None:
        self.nat.apply(job.nat_pools, job.all_pools)

    def _resolve_orphan(self, link: HostLink) -> dict[str, Any]:
        """An unexplained host link: restore its registration from IPAM, remove it when
        it is down and nobody holds it, or keep it (see fabric.agent.workloads)."""
        node = self.config.node_name
        log = self.log.bind(link=link.name)
        try:
            for held in self.ipam.handles(node):
                if links.host_ifname(held.handle) != link.name:
                    continue
                if self._restore_registration(held):
                    log.warning("restored a lost workload registration from IPAM",
                                handle=held.handle)
                    return {"link": link.name, "outcome": "restored"}
                return {"link": link.name, "outcome": "registered"}
            if not link.up:
                links.remove(link.name, link.index)
                log.warning("removed a host link nobody registered (left by a crash)")
                return {"link": link.name, "outcome": "removed"}
            if self._adopt(link):
                return {"link": link.name, "outcome": "adopted"}
        except Exception as exc:
            log.warning("could not resolve an unregistered host link", error=str(exc))
        log.warning("unregistered host link kept: it is up and no IPAM handle names it")
        return {"link": link.name, "outcome": "kept"}

    def _adopt(self, link: HostLink) -> bool:
        """A live container interface etcd knows nothing of (a restore from an older
        backup): the addresses our routes send to it are recorded again under a
        handle of its own, with a registration naming the link, so that no new
        container is given them. The registration goes with the link (`ReleaseGone`)."""
        sock = RouteSocket(self.config.route_protocol)
        try:
            routed = sorted(str(r.prefix).partition("/")[0] for r in sock.dump()
                            if r.oif == link.index and not r.gateways and r.type == "unicast")
        finally:
            sock.close()
        if not routed:
            return False
        handle = f"adopted.{link.name}"
        held = self.ipam.adopt(handle, self.config.node_name, routed, {"adopted": link.name})
        record = Workload(handle, self.config.node_name, "", "", "", held.addresses(),
                          None, link.name, time.time(), "")
        self.registry.register_workload(record)
        self.log.warning("adopted a live container interface etcd did not know", link=link.name,
                         addresses=routed, handle=handle)
        return True

    def _restore_registration(self, held: Any) -> bool:
        attrs = held.attrs
        record = Workload(held.handle, self.config.node_name, attrs.get("container_id", ""),
                          attrs.get("ifname", ""), attrs.get("netns", ""),
                          held.addresses(), None, links.host_ifname(held.handle),
                          time.time(), attrs.get("network", ""), attrs.get("namespace", ""),
                          _labels_attr(attrs.get("labels", "")))
        return self.registry.restore_workload(record)

    # -- servers -----------------------------------------------------------------------
    def _serve_cni(self, raw: bytes, fds: list[int]) -> bytes:
        try:
            fields = decode_request(raw)
        except ValueError as exc:
            error = CniError(DECODE_FAILURE, f"malformed request from the plugin: {exc}")
            return b"1\n" + json.dumps(error.document(LATEST)).encode() + b"\n"
        status, output = self.cni.handle(fields, netns_fd=fds[0] if fds else None)
        return b"%d\n" % status + output

    def _serve_control(self, raw: bytes, _fds: list[int]) -> bytes:
        try:
            request = json.loads(raw)
            method = str(request["method"])
            params = dict(request.get("params") or {})
            handlers: dict[str, Callable[..., Any]] = {
                "status": self.status, "bgp_routes": self._bgp_routes,
                "routes": self._kernel_routes, "policy": self._policy_table}
            handler = handlers.get(method)
            if handler is None:
                return json.dumps({"error": f"unknown method {method!r}"}).encode()
            return json.dumps({"result": handler(**params)}, default=str).encode()
        except Exception as exc:
            self.log.exception("control request failed")
            return json.dumps({"error": str(exc) or type(exc).__name__}).encode()

    def status(self) -> dict[str, Any]:
        doc = self.loop.ask(lambda s: s.status())
        doc["version"] = __version__
        doc["started_at"] = self.started_at
        doc["bgp_process"]["log"] = str(self.speaker.log_path)
        health = self.health()
        health["degraded"] = doc.pop("degraded")
        health["healthy"] = health["healthy"] and not health["degraded"]
        doc["health"] = health
        return doc

    def _bgp_routes(self, peer: str | None = None, which: str = "received") -> list[Any]:
        return self.loop.ask(lambda s: s.bgp_routes(peer, which))

    def _kernel_routes(self) -> dict[str, Any]:
        sock = RouteSocket(self.config.route_protocol)
        try:
            found = sock.dump()
        finally:
            sock.close()
        desired, kept, drift, failed = self.loop.ask(lambda s: (
            s.desired.effective(), s.desired.kept(), [d.to_dict() for d in s.drift],
            {str(p): e for p, e in s.failed.items()}))
        names = {index: name for name, index in links.host_links("").items()}
        rows = []
        for route in sorted(found, key=lambda r: r.prefix):
            want = desired.get(route.prefix)
            rows.append({"prefix": str(route.prefix), "type": route.type,
                         "via": list(route.gateways),
                         "dev": names.get(route.oif) if route.oif else None,
                         "kind": want.kind if want else kind_of(route),
                         "in_sync": want == route,
                         "stale": want is None and route.prefix in kept})
        return {"routes": rows, "drift": drift, "failed": failed,
                "protocol": self.config.route_protocol}

    def _policy_table(self) -> dict[str, Any]:
        """The nftables table as the kernel lists it, and the agent's view of it."""
        nft = Nft()
        try:
            listing = nft.list_table()
        except NftError as exc:
            listing, error = None, str(exc)
        else:
            error = ""
        finally:
            nft.close()
        status = self.loop.ask(lambda s: s.policy.status())
        return {"listing": listing, "error": error, "status": status,
                "node": self.config.node_name}

    def _collect_metrics(self) -> list[metrics.Family]:
        status = self.status()
        counters = dict(status["counters"], mirror_errors=sum(x.errors for x in self._mirrors))
        return metrics.families(status, counters)

    # -- health ------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Every thread the agent needs, alive or not, and the loop's last beat."""
        threads = {name: thread.is_alive() for name, thread in sorted(self._threads.items())}
        beat_age = self.clock.monotonic() - self.loop.beat
        return {"threads": threads, "loop_beat_age": round(beat_age, 3),
                "healthy": all(threads.values()) and beat_age < STUCK_LOOP}

    def problems(self) -> list[str]:
        """Why the agent is unhealthy (empty when it is not); main() exits on these."""
        health = self.health()
        dead = [name for name, alive in health["threads"].items() if not alive]
        found = [f"thread {name} died" for name in dead]
        if health["loop_beat_age"] >= STUCK_LOOP:
            found.append(f"owner loop stuck for {health['loop_beat_age']:.0f}s")
        return found

    # -- stop --------------------------------------------------------------------------
    def _leave(self) -> None:
        """Our routes withdrawn by the owner loop (it owns what we announce), and waited
        for until ExaBGP has taken them; after LEAVE_TIMEOUT the stop goes on anyway and
        the peers' graceful-restart timers do the rest."""
        if not hasattr(self, "loop"):
            return  # stopped before it ran: nothing was announced
        done: Future[bool] = Future()
        self.loop.post(m.Leave(done))
        try:
            answered = done.result(LEAVE_TIMEOUT)
        except TimeoutError:
            answered = False
        if answered:
            time.sleep(LEAVE_SETTLE)  # ExaBGP said done; its UPDATEs leave meanwhile
        self.log.info("leaving: withdrew our routes", answered=answered)

    def stop(self, leave: bool = False) -> None:
        """Stop ExaBGP (SIGTERM: it closes its sessions without a NOTIFICATION, so peers
        keep our routes for the graceful-restart time) and every thread; the kernel
        keeps every route.

        `leave`: the machine is going down, not just the agent (fabric-agent.service
        sends SIGUSR2 when systemd is stopping the system): first withdraw our own
        routes, so that peers drop them at once instead of keeping them, stale, for
        our graceful-restart time. A restarted agent (an upgrade, a crash) does not
        leave: its routes keep forwarding meanwhile."""
        self._stopping = True
        self.log.info("agent stopping", leave=leave)
        if leave:
            self._leave()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for server in (getattr(self, "dns", None), getattr(self, "metrics", None)):
            if server is not None:
                server.stop()
        if hasattr(self, "speaker"):
            self.speaker.stop()
        for mirror in self._mirrors:
            mirror.stop()
        if hasattr(self, "loop"):
            self.loop.stop()
            for worker in (self.etcd_jobs, self.host_jobs):
                worker.stop()
            self.writer.stop()
            self.policy_table.close()
        if hasattr(self, "registration"):
            self.registration.withdraw_liveness()
        if hasattr(self, "store"):
            self.store.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        self.log.info("agent stopped")


class LoopRoutes:
    """The CNI handler's view of host routes: requests to the owner loop, answered once
    the kernel writer has applied them (see cni.handler.WorkloadRoutes)."""

    def __init__(self, loop: OwnerLoop, timeout: float = 30.0) -> None:
        self.loop = loop
        self.timeout = timeout

    def attach(self, handle: str, ips: Sequence[str], host_ifname: str, index: int,
               namespace: str = "", labels: Mapping[str, str] | None = None,
               name: str = "") -> list[Failure]:
        reply: Future[list[Failure]] = Future()
        policy: Future[PolicyReport] = Future()
        self.loop.post(m.Attach(handle, tuple(ips), host_ifname, index, reply, namespace,
                                tuple(sorted((labels or {}).items())), name, policy))
        report = policy.result(self.timeout)
        failures = reply.result(self.timeout)
        if not report.ok:
            raise CniError(IO_FAILURE, f"network policy for the workload could not be "
                                       f"enforced (no route installed): {report.error}")
        return failures

    def detach(self, handle: str, ips: Sequence[str],
               host_ifname: str | None) -> list[Failure]:
        reply: Future[list[Failure]] = Future()
        self.loop.post(m.Detach(handle, tuple(ips), host_ifname, reply))
        return reply.result(self.timeout)

    def missing(self, ips: Sequence[str], index: int | None = None) -> list[str]:
        wanted = self.loop.ask(lambda s: dict(s.desired.source("workloads")))
        return [a for a in ips if (route := wanted.get(Prefix.parse(a))) is None
                or (index is not None and route.oif != index)]



def _labels_attr(text: str) -> dict[str, str]:
    """Workload labels kept in an IPAM handle's attributes (as JSON)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
