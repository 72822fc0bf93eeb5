"""fabric-agent: what runs on every host, and the order it starts and stops things.

Start: reach etcd, take over the kernel routes a previous run left, register the
node, mirror etcd, start ExaBGP with a configuration that already holds our blocks,
then serve the CNI plugin, fabricctl, DNS and metrics. Stop (SIGTERM): stop serving,
stop ExaBGP (it closes the sessions with a Cease), leave the kernel as it is: the
routes keep forwarding until the next agent takes them over.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bgp import api
from bgp.speaker import Speaker
from cni.handler import CniHandler
from cni.shim import decode_request
from fabric import __version__, logs, sockets
from fabric.agent import metrics
from fabric.agent.config import AgentConfig
from fabric.agent.dns import DnsServer
from fabric.agent.registration import Registration
from fabric.agent.routing import RoutingController, borrowed_records
from fabric.kernel import links
from fabric.kernel.nat import NatError, OutgoingNat
from fabric.kernel.netlink import RouteSocket
from fabric.kernel.reconciler import Reconciler
from fabric.kernel.routes import kind_of, workload
from fabric.model.blocks import Block
from fabric.model.nodes import Node
from fabric.model.peers import BgpConfig, PeerSpec
from fabric.model.pools import Pool
from fabric.model.prefix import Prefix
from fabric.store import keys
from fabric.store.datastore import Datastore
from fabric.store.errors import DatastoreError, Unavailable
from fabric.store.registry import Registry
from fabric.store.watch import Mirror, Snapshot
from ipam.allocator import Ipam
from ipam.gc import LeakTracker, collect

ETCD_WAIT = 120.0
T = TypeVar("T")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.log = logs.get("agent", node=config.node_name)
        self.stopping = threading.Event()
        self.started_at = time.time()
        self.etcd_errors = 0
        self.gc_runs = 0
        self.gc_released = 0
        self._workload_names: dict[str, list[str]] = {}
        self._servers: list[Any] = []
        self._mirrors: list[Mirror] = []
        self._threads: list[threading.Thread] = []
        self._static_plan: dict[str, set[str]] = {}
        self._orphans: dict[str, int] = {}

    # -- start -------------------------------------------------------------------------
    def start(self) -> None:
        config = self.config
        self.store = self._connect()
        links.enable_forwarding()
        self.reconciler = Reconciler(config.route_protocol, config.resync_interval)
        taken = self.reconciler.take_over()
        self.ipam = Ipam(self.store)
        self.registry = Registry(self.store)
        entry = self.store.get(keys.BGP_CONFIG)
        bgp_config = BgpConfig.from_record(entry.value if entry else None)
        node = Node(config.node_name, config.node_address, config.asn or bgp_config.asn,
                    dict(config.labels), config.rr_cluster_id, time.time(), __version__)
        self.registration = Registration(self.store, node, config.lease_ttl)
        self.registration.register()
        self.registration.start()
        self.routing = RoutingController(
            node, self.reconciler, hold_time=config.hold_time,
            graceful_restart=config.graceful_restart, ecmp=config.ecmp,
            max_prefixes=config.max_prefixes, fixed_asn=config.asn)
        self.routing.on_asn_change = self._asn_changed
        self.refresh_workload_routes()
        self._start_mirrors()
        self.speaker = Speaker(
            config.exabgp_path(), config.run_path,
            _exabgp_env(config), f"@l3fabric/bgp/{config.node_name}",
            self.routing.on_event, lambda _code: self.routing.on_speaker_exit())
        self.routing.speaker = self.speaker
        self.routing.relay_command = self.speaker.relay_command
        first = self.routing.render()
        self._static_plan = self.routing.static_plan()
        self.speaker.start(first)
        self.reconciler.start()
        self.nat = OutgoingNat()
        self._apply_nat()
        # DNS and metrics are conveniences: a port taken by another service must not
        # keep the node out of the fabric, so their failure is logged, not fatal.
        if config.dns_port:
            try:
                self.dns = DnsServer(config.node_address, config.dns_port,
                                     config.dns_domain, self._lookup)
                self.dns.start()
            except OSError as exc:
                self.log.error("workload DNS not served; change [dns] port or free it",
                               port=config.dns_port, error=exc.strerror)
        if config.metrics_port:
            try:
                self.metrics = metrics.MetricsServer("0.0.0.0", config.metrics_port,
                                                     self._collect_metrics)
                self.metrics.start()
            except OSError as exc:
                self.log.error("metrics not served; change [metrics] port or free it",
                               port=config.metrics_port, error=exc.strerror)
        self.cni = CniHandler(config.node_name, self.ipam, self.registry, self.reconciler,
                              dns=self._dns_for_workloads())
        self._servers.append(sockets.serve(config.cni_socket, self._serve_cni, "cni"))
        self._servers.append(sockets.serve(config.control_socket, self._serve_control,
                                           "control"))
        for target, name in ((self._render_loop, "render"), (self._timers, "timers")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.log.info("agent started", address=config.node_address, asn=node.asn,
                      routes_taken_over=taken, exabgp_pid=self.speaker.process.pid
                      if self.speaker.process else None)

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
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise
                self.log.warning("waiting for etcd", error=str(exc))
                self.stopping.wait(delay)
                delay = min(delay * 2, 5.0)

    def _start_mirrors(self) -> None:
        def pools(snap: Snapshot) -> None:
            self.routing.set_state(pools=_records(snap, Pool.from_record))
            if hasattr(self, "nat"):
                self._apply_nat()

        def nodes(snap: Snapshot) -> None:
            self.routing.set_state(nodes=_records(snap, Node.from_record))

        def specs(snap: Snapshot) -> None:
            self.routing.set_state(specs=_records(snap, PeerSpec.from_record))

        def workloads(snap: Snapshot) -> None:
            names: dict[str, list[str]] = {}
            for value in snap.values():
                name = value.get("name")
                if name:
                    names.setdefault(str(name), []).extend(str(i) for i in value.get("ips", []))
            self._workload_names = names

        watched = (
            (keys.POOLS, pools, "pools"),
            (keys.NODES, nodes, "nodes"),
            (keys.BLOCKS, lambda s: self.routing.set_state(
                blocks=_records(s, Block.from_record)), "blocks"),
            (keys.BORROWED, lambda s: self.routing.set_state(borrowed=borrowed_records(s)),
             "borrowed"),
            (keys.BGP_CONFIG, lambda s: self.routing.set_state(
                config=BgpConfig.from_record(next(iter(s.values()), None))), "bgp-config"),
            (keys.BGP_PEERS, specs, "bgp-peers"),
            (keys.WORKLOADS, workloads, "workloads"),
        )
        for prefix, callback, name in watched:
            mirror = Mirror(self.store, prefix, callback, name)
            mirror.start()
            self._mirrors.append(mirror)
        for mirror in self._mirrors:
            if not mirror.ready.wait(30):
                raise Unavailable(f"etcd: could not read {mirror.prefix}")

    def _asn_changed(self, node: Node) -> None:
        try:
            self.registration.update(node)
        except DatastoreError as exc:
            self.log.warning("could not update the node record", error=str(exc))

    # -- loops -------------------------------------------------------------------------
    def _render_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.routing.take_render(1.0):
                continue
            time.sleep(0.01)  # coalesce a burst of etcd events into one reload
            try:
                config = self.routing.render()
                plan = self.routing.static_plan()
                withdrawals = []
                for peer, old in self._static_plan.items():
                    gone = old - plan.get(peer, set())
                    withdrawals += [api.withdraw(p, peer) for p in sorted(gone)]
                self._static_plan = plan
                self.speaker.reconfigure(config)
                for command in withdrawals:
                    self.speaker.send(command)
            except Exception:
                self.log.exception("could not reconfigure exabgp")

    def _timers(self) -> None:
        tracker = LeakTracker(grace=self.config.gc_grace)
        next_gc = time.monotonic() + min(self.config.gc_interval, 30.0)
        next_workloads = time.monotonic() + self.config.resync_interval
        while not self.stopping.wait(1.0):
            try:
                self.routing.tick()
            except Exception:
                self.log.exception("routing timer failed")
            now = time.monotonic()
            if now >= next_workloads:
                next_workloads = now + self.config.resync_interval
                try:
                    self.refresh_workload_routes()
                except DatastoreError as exc:
                    self.etcd_errors += 1
                    self.log.warning("could not refresh workload routes", error=str(exc))
            if now >= next_gc:
                next_gc = now + self.config.gc_interval
                try:
                    result = collect(self.ipam, self.config.node_name, tracker)
                    self.gc_runs += 1
                    self.gc_released += len(result.released)
                except DatastoreError as exc:
                    self.etcd_errors += 1
                    self.log.warning("ipam gc failed", error=str(exc))

    def refresh_workload_routes(self) -> None:
        """/32 routes to this node's registered workloads whose host interface exists,
        and removal of host interfaces nobody registered (left by a crash mid-ADD or
        mid-DEL): those seen unregistered on two rounds in a row go."""
        present = links.host_links()
        routes = {}
        registered = set()
        for item in self.registry.workloads(self.config.node_name):
            registered.add(item.host_ifname)
            index = present.get(item.host_ifname or "")
            if index is None:
                continue
            for address in item.ips:
                prefix = Prefix.parse(address)
                routes[prefix] = workload(prefix, index)
        self.reconciler.replace("workloads", routes)
        orphans = {name: index for name, index in present.items() if name not in registered}
        for name, index in orphans.items():
            if self._orphans.get(name) == index:
                self.log.warning("removing unregistered workload interface", link=name)
                links.remove(name, index)
        self._orphans = orphans

    def _apply_nat(self) -> None:
        if not self.config.nat_outgoing:
            return
        pools = self.routing.state.pools
        try:
            self.nat.apply([p.cidr for p in pools if p.nat_outgoing],
                           [p.cidr for p in pools])
        except NatError as exc:
            self.log.error("outgoing NAT not applied", error=str(exc))

    # -- servers -----------------------------------------------------------------------
    def _serve_cni(self, raw: bytes, fds: list[int]) -> bytes:
        try:
            fields = decode_request(raw)
        except ValueError as exc:
            return b'1\n{"cniVersion":"1.1.0","code":6,"msg":"%s"}\n' % str(exc).encode()
        status, output = self.cni.handle(fields, netns_fd=fds[0] if fds else None)
        return b"%d\n" % status + output

    def _serve_control(self, raw: bytes, _fds: list[int]) -> bytes:
        try:
            request = json.loads(raw)
            method = str(request["method"])
            params = dict(request.get("params") or {})
            handlers: dict[str, Callable[..., Any]] = {
                "status": self._status, "bgp_routes": self._bgp_routes,
                "routes": self._kernel_routes}
            handler = handlers.get(method)
            if handler is None:
                return json.dumps({"error": f"unknown method {method!r}"}).encode()
            return json.dumps({"result": handler(**params)}, default=str).encode()
        except Exception as exc:
            self.log.exception("control request failed")
            return json.dumps({"error": str(exc)}).encode()

    def _status(self) -> dict[str, Any]:
        speaker = self.speaker
        status = self.routing.status()
        status.update({
            "version": __version__,
            "started_at": self.started_at,
            "registration": {"healthy": self.registration.healthy,
                             "last_refresh": self.registration.last_refresh,
                             "ttl": self.registration.ttl},
            "bgp_process": {"running": speaker.running, "connected": speaker.connected,
                            "pid": speaker.process.pid if speaker.process else None,
                            "started_at": speaker.started_at, "restarts": speaker.restarts,
                            "log": str(speaker.log_path)},
            "kernel": self.reconciler.stats.__dict__,
            "stale_routes": len(self.reconciler.stale()),
        })
        return status

    def _bgp_routes(self, peer: str | None = None, which: str = "received") -> list[Any]:
        return self.routing.routes(peer, which)

    def _kernel_routes(self) -> dict[str, Any]:
        sock = RouteSocket(self.config.route_protocol)
        try:
            found = sock.dump()
        finally:
            sock.close()
        names = {index: name for name, index in links.host_links("").items()}
        desired = self.reconciler.desired()
        rows = []
        for route in sorted(found, key=lambda r: r.prefix):
            want = desired.get(route.prefix)
            rows.append({"prefix": str(route.prefix), "type": route.type,
                         "via": list(route.gateways),
                         "dev": names.get(route.oif) if route.oif else None,
                         "kind": want.kind if want else kind_of(route),
                         "in_sync": want == route,
                         "stale": want is None})
        return {"routes": rows, "drift": [d.to_dict() for d in self.reconciler.drift],
                "failed": {str(p): e for p, e in self.reconciler.failed.items()},
                "protocol": self.config.route_protocol}

    def _lookup(self, name: str) -> list[str]:
        return list(self._workload_names.get(name, ()))

    def _dns_for_workloads(self) -> dict[str, Any]:
        if getattr(self, "dns", None) is None:
            return {}
        return {"nameservers": [self.config.node_address],
                "search": [self.config.dns_domain]}

    def _collect_metrics(self) -> list[metrics.Family]:
        status = self.routing.status()
        states: dict[str, int] = {}
        for peer in status["peers"]:
            states[peer["state"]] = states.get(peer["state"], 0) + 1
        per_peer = []
        for what in ("received", "accepted", "rejected", "advertised"):
            per_peer.append(metrics.Family(
                f"bgp_routes_{what}", "gauge", f"routes {what} per peer",
                tuple(metrics.Sample(f"bgp_routes_{what}", p[what], {"peer": p["address"]})
                      for p in status["peers"])))
        reasons = tuple(metrics.Sample("bgp_routes_rejected_total", count,
                                       {"peer": p["address"], "reason": reason})
                        for p in status["peers"]
                        for reason, count in p["rejected_by_reason"].items())
        kernel = self.reconciler.stats
        installed = self.reconciler.desired()
        mirror_errors = sum(m.errors for m in self._mirrors)
        return [
            metrics.Family("bgp_sessions", "gauge", "BGP sessions by state",
                           tuple(metrics.Sample("bgp_sessions", n, {"state": s})
                                 for s, n in sorted(states.items()))),
            *per_peer,
            metrics.Family("bgp_routes_rejected_total", "counter",
                           "routes rejected by import policy, by reason", reasons),
            metrics.Family("kernel_routes", "gauge", "routes the agent wants in the kernel",
                           tuple(metrics.Sample("kernel_routes", n, {"kind": k})
                                 for k, n in _count_kinds(installed.values()).items())),
            metrics.Family("kernel_route_failures_total", "counter",
                           "route changes the kernel refused",
                           (metrics.Sample("kernel_route_failures_total", kernel.failures),)),
            metrics.Family("kernel_drift_repaired_total", "counter",
                           "routes repaired after a resync found them changed",
                           (metrics.Sample("kernel_drift_repaired_total", kernel.repaired),)),
            metrics.Family("reconcile_seconds", "gauge", "duration of the last kernel "
                           "resync and the last incremental apply",
                           (metrics.Sample("reconcile_seconds", kernel.last_resync_seconds,
                                           {"phase": "resync"}),
                            metrics.Sample("reconcile_seconds", kernel.last_apply_seconds,
                                           {"phase": "apply"}))),
            metrics.Family("etcd_errors_total", "counter", "etcd operations that failed",
                           (metrics.Sample("etcd_errors_total",
                                           self.etcd_errors + mirror_errors),)),
            metrics.Family("ipam_gc_released_total", "counter",
                           "leaked allocations freed by GC",
                           (metrics.Sample("ipam_gc_released_total", self.gc_released),)),
        ]

    # -- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        """Close sessions and stop ExaBGP; the kernel keeps every route."""
        self.stopping.set()
        self.log.info("agent stopping")
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if getattr(self, "dns", None):
            self.dns.stop()
        if getattr(self, "metrics", None):
            self.metrics.stop()
        if getattr(self, "speaker", None):
            self.speaker.stop()
        for mirror in self._mirrors:
            mirror.stop()
        if getattr(self, "reconciler", None):
            self.reconciler.stop()
        if getattr(self, "registration", None):
            self.registration.stop(revoke=False)
        if getattr(self, "store", None):
            self.store.close()
        self.log.info("agent stopped")


def _records(snap: Snapshot, parse: Callable[[dict[str, Any]], T]) -> tuple[T, ...]:
    """Every record of a mirror that parses; unreadable ones were logged by the mirror."""
    found = []
    for value in snap.values():
        try:
            found.append(parse(value))
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(found)



def _count_kinds(routes: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for route in routes:
        counts[route.kind] = counts.get(route.kind, 0) + 1
    return counts


def _exabgp_env(config: AgentConfig) -> dict[str, str]:
    from bgp.config import environment

    return environment(config.node_address, str(config.run_path / "exabgp.pid"))
