"""Prometheus metrics: the text format rendered from samples (pure), served over HTTP.

Names are prefixed `l3fabric_`. Sessions by state, routes received / accepted /
rejected (by reason) / advertised per peer, routes installed, reconcile durations,
etcd errors.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # gauge or counter
    help: str
    samples: tuple[Sample, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    lines = []
    for family in families:
        lines.append(f"# HELP l3fabric_{family.name} {family.help}")
        lines.append(f"# TYPE l3fabric_{family.name} {family.kind}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            suffix = f"{{{labels}}}" if labels else ""
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            lines.append(f"l3fabric_{sample.name}{suffix} {value}")
    return "\n".join(lines) + "\n"


def families(status: Mapping[str, Any], counters: Mapping[str, int]) -> list[Family]:
    """The metric families, from `node status`'s document and the agent's counters."""
    peers = status["peers"]
    states: dict[str, int] = {}
    for peer in peers:
        states[peer["state"]] = states.get(peer["state"], 0) + 1
    per_peer = [Family(f"bgp_routes_{what}", "gauge", f"routes {what} per peer",
                       tuple(Sample(f"bgp_routes_{what}", p[what], {"peer": p["address"]})
                             for p in peers))
                for what in ("received", "accepted", "rejected", "advertised")]
    reasons = tuple(Sample("bgp_routes_rejected_total", count,
                           {"peer": p["address"], "reason": reason})
                    for p in peers for reason, count in p["rejected_by_reason"].items())
    kernel = status["kernel"]
    health = status.get("health", {})
    policy = status.get("policy") or {}
    return [
        Family("bgp_sessions", "gauge", "BGP sessions by state",
               tuple(Sample("bgp_sessions", n, {"state": s}) for s, n in sorted(states.items()))),
        *per_peer,
        Family("bgp_routes_rejected_total", "counter",
               "routes rejected by import policy, by reason", reasons),
        Family("kernel_routes", "gauge", "routes the agent wants in the kernel",
               tuple(Sample("kernel_routes", n, {"kind": k})
                     for k, n in sorted(status.get("route_kinds", {}).items()))),
        Family("kernel_route_failures_total", "counter", "route changes the kernel refused",
               (Sample("kernel_route_failures_total", kernel["failures"]),)),
        Family("kernel_drift_repaired_total", "counter",
               "routes repaired after a resync found them changed",
               (Sample("kernel_drift_repaired_total", kernel["repaired"]),)),
        Family("reconcile_seconds", "gauge",
               "duration of the last kernel resync and the last incremental apply",
               (Sample("reconcile_seconds", kernel["last_resync_seconds"], {"phase": "resync"}),
                Sample("reconcile_seconds", kernel["last_apply_seconds"], {"phase": "apply"}))),
        Family("etcd_errors_total", "counter", "etcd operations that failed",
               (Sample("etcd_errors_total",
                       counters.get("etcd_errors", 0) + counters.get("mirror_errors", 0)),)),
        Family("ipam_gc_released_total", "counter", "leaked allocations freed by GC",
               (Sample("ipam_gc_released_total", counters.get("gc_released", 0)),)),
        Family("agent_threads_alive", "gauge", "agent threads alive (1) or dead (0)",
               tuple(Sample("agent_threads_alive", int(alive), {"thread": name})
                     for name, alive in sorted(health.get("threads", {}).items()))),
        Family("agent_healthy", "gauge", "1 while every agent thread runs, the loop beats "
               "and nothing is degraded (ExaBGP down, registration failing)",
               (Sample("agent_healthy", int(bool(health.get("healthy", False)))),)),
        Family("policy_rules", "gauge", "network policy rules and sets in this host's table",
               (Sample("policy_rules", policy.get("rules", 0), {"what": "rules"}),
                Sample("policy_rules", policy.get("sets", 0), {"what": "sets"}))),
        Family("policy_in_sync", "gauge", "1 while the policy table holds what is wanted",
               (Sample("policy_in_sync", int(bool(policy.get("in_sync", False)))),)),
        Family("policy_apply_failures_total", "counter",
               "policy table changes nftables refused",
               (Sample("policy_apply_failures_total", policy.get("failures", 0)),)),
        Family("policy_drift_repaired_total", "counter",
               "policy table replacements after a check found it changed",
               (Sample("policy_drift_repaired_total", policy.get("repaired", 0)),)),
    ]


MAX_CLIENTS = 8  # scrapes served at once; more connections are closed at once
MAX_PER_ADDRESS = 2  # of those, from one source address
CLIENT_TIMEOUT = 5.0  # seconds a client may take to send its request


class _BoundedServer(http.server.ThreadingHTTPServer):
    """At most MAX_CLIENTS connections at a time, each with a deadline: the port is
    reachable from every container on the host (their default route leads to it), and
    a thread per idle connection once let one container take the agent's descriptors
    (1,024 idle connections: every netlink listing failed, CNI requests timed out).
    And at most MAX_PER_ADDRESS from one source address, so that one container holding
    connections open cannot keep Prometheus out."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # the slots: taken here, given back by handlers
        self._open: dict[str, int] = {}  # source address -> connections being served
        self.refused = 0

    def _take(self, source: str) -> bool:
        with self._lock:
            if sum(self._open.values()) >= MAX_CLIENTS or \
                    self._open.get(source, 0) >= MAX_PER_ADDRESS:
                self.refused += 1
                return False
            self._open[source] = self._open.get(source, 0) + 1
            return True

    def _give_back(self, source: str) -> None:
        with self._lock:
            left = self._open.pop(source) - 1
            if left:
                self._open[source] = left

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take(client_address[0]):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._give_back(client_address[0])
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give_back(client_address[0])


class MetricsServer:
    def __init__(self, address: str, port: int, collect: Callable[[], list[Family]]) -> None:
        collect_ = collect

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = CLIENT_TIMEOUT

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                body = render(collect_()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                return

        self.server = _BoundedServer((address, port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> threading.Thread:
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
