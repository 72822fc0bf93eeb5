"""A multi-host fabric in network namespaces: the lab, and the tests' real hosts.

Layout for a lab named LAB (every namespace starts with `LAB-`):

    LAB-net      the underlay segment: bridge `br0`, the router address (.254) that
                 hosts use as default gateway, and etcd listening on it
    LAB-hN       host N: `eth0` on the underlay (.10+N), its own fabric-agent and
                 ExaBGP, reaching etcd over the underlay like a real host
    LAB-hN-wM    workload M on host N, attached by the real CNI plugin
    LAB-peer     optional BIRD or FRR speaker on the underlay (.253)

State is written to `<base>/<LAB>/state.json` before each thing is made, so `down`
can remove everything even after a crash half-way through `up`; `down` also sweeps
namespaces by prefix and processes by the PIDs it recorded (never by name).
etcd also listens on a unix socket in the lab directory so tools outside the
namespaces (fabricctl, tests) can reach it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fabric import logs
from fabric.kernel import netns
from fabric.lab.etcd import EtcdServer
from fabric.processes import is_running, kill_pid

BASE_DIR = Path("/run/l3fabric-lab")
DEFAULT_UNDERLAY = "10.99.0.0/24"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


class LabError(RuntimeError):
    pass


@dataclass
class HostState:
    name: str
    netns: str
    address: str
    run_dir: str
    agent_pid: int | None = None
    asn: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    agent_args: list[str] = field(default_factory=list)
    alive: bool = True


@dataclass
class WorkloadState:
    name: str
    host: str
    netns: str
    container_id: str
    ips: list[str] = field(default_factory=list)


@dataclass
class PeerState:
    kind: str  # bird or frr
    netns: str
    address: str
    asn: int
    pids: list[int] = field(default_factory=list)
    run_dir: str = ""
    role: str = "rr"


@dataclass
class LabState:
    name: str
    underlay: str = DEFAULT_UNDERLAY
    etcd_pid: int | None = None
    hosts: dict[str, HostState] = field(default_factory=dict)
    workloads: dict[str, WorkloadState] = field(default_factory=dict)
    peer: PeerState | None = None
    created_at: float = field(default_factory=time.time)
    complete: bool = False

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LabState:
        state = cls(doc["name"], doc.get("underlay", DEFAULT_UNDERLAY), doc.get("etcd_pid"),
                    created_at=doc.get("created_at", 0.0), complete=doc.get("complete", False))
        state.hosts = {k: HostState(**v) for k, v in doc.get("hosts", {}).items()}
        state.workloads = {k: WorkloadState(**v) for k, v in doc.get("workloads", {}).items()}
        state.peer = PeerState(**doc["peer"]) if doc.get("peer") else None
        return state


def python_bin(name: str) -> str:
    """An executable installed beside the running interpreter (the project's venv)."""
    return str(Path(sys.executable).with_name(name))


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


class Lab:
    def __init__(self, name: str, base_dir: Path = BASE_DIR) -> None:
        if not re.match(r"^[a-z0-9]{1,10}$", name):
            raise LabError(f"lab name {name!r}: use 1 to 10 lower-case letters or digits "
                           "(namespace and interface names are built from it)")
        self.name = name
        self.dir = base_dir / name
        self.state_path = self.dir / "state.json"
        self.log = logs.get("lab", lab=name)
        self.state = self._load() or LabState(name)

    # -- state -------------------------------------------------------------------------
    def _load(self) -> LabState | None:
        try:
            return LabState.from_dict(json.loads(self.state_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        os.replace(tmp, self.state_path)

    @property
    def exists(self) -> bool:
        return self.state_path.exists() or bool(netns.names(f"{self.name}-"))

    @property
    def net_ns(self) -> str:
        return f"{self.name}-net"

    def _address(self, index: int) -> str:
        network = ipaddress.ip_network(self.state.underlay)
        return str(network.network_address + index)

    @property
    def router(self) -> str:
        return self._address(254)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.state.underlay).prefixlen

    @property
    def etcd_endpoint(self) -> str:
        """How agents reach etcd: over the underlay, like real hosts."""
        return f"http://{self.router}:{ETCD_CLIENT_PORT}"

    @property
    def etcd_local_endpoint(self) -> str:
        """How tools outside the namespaces reach etcd: its unix socket."""
        return f"unix://{self.dir}/etcd/etcd:{ETCD_CLIENT_PORT}"

    # -- underlay and etcd -------------------------------------------------------------
    def create_underlay(self, underlay: str = DEFAULT_UNDERLAY) -> None:
        self.state.underlay = underlay
        self.save()
        netns.create(self.net_ns)
        _ip("-n", self.net_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.net_ns, "addr", "add", f"{self.router}/{self.prefixlen}", "dev", "br0")
        _ip("-n", self.net_ns, "link", "set", "br0", "up")

    def start_etcd(self) -> None:
        server = EtcdServer.start(self.dir / "etcd", host=self.router, port=ETCD_CLIENT_PORT,
                                  peer_port=ETCD_PEER_PORT, netns=self.net_ns,
                                  name=f"{self.name}-etcd")
        self.state.etcd_pid = server.pid
        self.save()

    def _port(self, host: str) -> str:
        """The bridge port of a host in the underlay namespace (15 characters at most)."""
        return f"p-{host}"[:15]

    def plug(self, ns: str, port: str, address: str, default_route: bool = True) -> None:
        """Connect a namespace to the underlay bridge as `eth0` with `address`."""
        _ip("-n", self.net_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", self.net_ns, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/{self.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        if default_route:
            _ip("-n", ns, "route", "add", "default", "via", self.router)

    # -- hosts -------------------------------------------------------------------------
    def add_host(self, name: str, *, asn: int | None = None,
                 labels: dict[str, str] | None = None, rr_cluster_id: str | None = None,
                 agent_args: list[str] | None = None, start: bool = True) -> HostState:
        if name in self.state.hosts:
            raise LabError(f"lab {self.name} already has a host {name}")
        index = 10 + len(self.state.hosts) + 1
        while any(h.address == self._address(index) for h in self.state.hosts.values()):
            index += 1
        host = HostState(name, f"{self.name}-{name}", self._address(index),
                         str(self.dir / name), asn=asn, labels=dict(labels or {}),
                         rr_cluster_id=rr_cluster_id, agent_args=list(agent_args or []))
        self.state.hosts[name] = host
        self.save()
        netns.create(host.netns)
        self.plug(host.netns, self._port(name), host.address)
        if start:
            self.start_agent(name)
        if self.state.peer:
            self.refresh_peer()
        return host

    def agent_argv(self, host: HostState) -> list[str]:
        argv = [python_bin("fabric-agent"), "--node-name", host.name,
                "--node-address", host.address, "--etcd-endpoints", self.etcd_endpoint,
                "--run-dir", host.run_dir, "--config", "/dev/null"]
        if host.asn:
            argv += ["--asn", str(host.asn)]
        if host.labels:
            argv += ["--labels", ",".join(f"{k}={v}" for k, v in host.labels.items())]
        if host.rr_cluster_id:
            argv += ["--rr-cluster-id", host.rr_cluster_id]
        return argv + host.agent_args

    def start_agent(self, name: str) -> int:
        host = self.state.hosts[name]
        Path(host.run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(host.run_dir) / "agent.log", "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, *self.agent_argv(host)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        host.agent_pid = process.pid
        host.alive = True
        self.save()
        return process.pid

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        host = self.state.hosts[name]
        if host.agent_pid:
            kill_pid(host.agent_pid, sig=sig)
        host.agent_pid = None
        self.save()

    def call(self, name: str, method: str, **params: Any) -> Any:
        """One request to a host's agent, through the host's network namespace."""
        from fabric import sockets

        return sockets.call(sockets.CONTROL_SOCKET, method,
                            netns=netns.path(self.state.hosts[name].netns), **params)

    def wait_agent(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the host's agent answers on its control socket."""
        from fabric import sockets

        host = self.state.hosts[name]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if host.agent_pid and not is_running(host.agent_pid):
                raise LabError(f"agent of {name} exited; see {host.run_dir}/agent.log")
            try:
                return self.call(name, "status")
            except (sockets.AgentUnreachable, sockets.AgentError) as exc:
                last = exc
                time.sleep(0.1)
        raise LabError(f"agent of {name} not answering after {timeout:.0f}s: {last}; "
                       f"see {host.run_dir}/agent.log")

    def kill_host(self, name: str) -> None:
        """A host dies: its underlay link goes down first (no goodbye reaches the peers),
        then everything running in its namespaces is killed."""
        host = self.state.hosts[name]
        port = self._port(name)
        with contextlib.suppress(LabError):
            _ip("-n", self.net_ns, "link", "set", port, "down")
        for ns in [host.netns] + [w.netns for w in self.state.workloads.values()
                                  if w.host == name]:
            for pid in netns.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if host.agent_pid:
            kill_pid(host.agent_pid, timeout=2, sig=signal.SIGKILL)
        host.agent_pid = None
        host.alive = False
        self.save()

    # -- an external BGP speaker -------------------------------------------------------
    @property
    def peer_ns(self) -> str:
        return f"{self.name}-peer"

    def add_peer(self, kind: str, role: str = "rr", asn: int | None = None,
                 fabric_asn: int = 64512) -> PeerState:
        """A BIRD or FRR speaker on the underlay, configured in etcd as a global peer.

        `rr`: route reflector in the fabric's AS, node mesh off. `tor`: eBGP ToR in
        its own AS (hosts should have their own AS each), node mesh off.
        """
        from fabric.model.peers import BgpConfig, PeerSpec
        from fabric.store import keys as fabric_keys

        if kind not in ("bird", "frr") or role not in ("rr", "tor"):
            raise LabError(f"peer {kind!r} as {role!r}: use bird|frr and rr|tor")
        asn = asn or (fabric_asn if role == "rr" else 65100)
        peer = PeerState(kind, self.peer_ns, self._address(253), asn,
                         run_dir=str(self.dir / "peer"), role=role)
        self.state.peer = peer
        self.save()
        netns.create(peer.netns)
        self.plug(peer.netns, "p-peer", peer.address)
        _ip("netns", "exec", peer.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        peer.pids = self._start_peer_daemon(peer)
        self.save()
        store = self.store()
        try:
            store.put(fabric_keys.BGP_CONFIG, BgpConfig(fabric_asn, node_mesh=False).to_record())
            spec = PeerSpec(f"lab-{kind}", peer.address, asn, route_reflector=role == "rr")
            store.put(fabric_keys.bgp_peer(spec.name), spec.to_record())
        finally:
            store.close()
        return peer

    def _neighbors(self, fabric_asn: int = 64512) -> list[Any]:
        from fabric.lab.peers import Neighbor
        return [Neighbor(h.name, h.address, h.asn or fabric_asn)
                for h in self.state.hosts.values()]

    def _start_peer_daemon(self, peer: PeerState) -> list[int]:
        from fabric.lab.peers import Bird, Frr, bird_config, frr_config

        run_dir = Path(peer.run_dir)
        if peer.kind == "bird":
            return [Bird(peer.netns, run_dir).start(
                bird_config(peer.address, peer.asn, self._neighbors(), peer.role))]
        return Frr(peer.netns, run_dir, peer.netns).start(
            frr_config(peer.address, peer.asn, self._neighbors(), peer.role,
                       str(run_dir / "frr.log")))

    def refresh_peer(self) -> None:
        """Tell the external speaker about hosts added since it started."""
        from fabric.lab.peers import Bird, Frr, bird_config

        peer = self.state.peer
        if peer is None:
            return
        run_dir = Path(peer.run_dir)
        if peer.kind == "bird":
            Bird(peer.netns, run_dir).reconfigure(
                bird_config(peer.address, peer.asn, self._neighbors(), peer.role))
            return
        frr = Frr(peer.netns, run_dir, peer.netns)
        commands = ["configure terminal", f"router bgp {peer.asn}"]
        for neighbor in self._neighbors():
            commands += [f"neighbor {neighbor.address} remote-as {neighbor.asn}",
                         f"neighbor {neighbor.address} timers 3 9",
                         "address-family ipv4 unicast",
                         f"neighbor {neighbor.address} activate"]
            if peer.role == "rr":
                commands.append(f"neighbor {neighbor.address} route-reflector-client")
            commands.append("exit-address-family")
        frr.vtysh(*commands)

    def add_pool(self, name: str, cidr: str, block_size: int | None = None,
                 **flags: bool) -> None:
        """An IP pool in the lab's etcd."""
        from fabric.model.pools import parse_pool
        from ipam.allocator import Ipam

        store = self.store()
        try:
            Ipam(store).add_pool(parse_pool(name, cidr, block_size, **flags))
        finally:
            store.close()

    def store(self) -> Any:
        from fabric.settings import EtcdSettings, parse_endpoints
        from fabric.store.datastore import Datastore

        return Datastore.connect(EtcdSettings(endpoints=parse_endpoints(
            self.etcd_local_endpoint)))

    # -- workloads ---------------------------------------------------------------------
    @property
    def cni_bin(self) -> Path:
        return self.dir / "cni" / "bin"

    def conflist(self) -> dict[str, Any]:
        from cni.install import conflist
        return conflist("lab")

    def install_cni(self) -> None:
        from cni.install import install
        install(str(self.cni_bin), str(self.dir / "cni" / "net.d"), network="lab")

    def add_workload(self, host_name: str, name: str | None = None,
                     dns_domain: str = "fabric.internal") -> WorkloadState:
        """A namespace attached to `host_name` through the real CNI plugin."""
        from cni import invoke

        host = self.state.hosts[host_name]
        if not (self.cni_bin / "l3fabric").exists():
            self.install_cni()
        count = sum(1 for w in self.state.workloads.values() if w.host == host_name)
        name = name or f"{host_name}-w{count + 1}"
        if name in self.state.workloads:
            raise LabError(f"lab {self.name} already has a workload {name}")
        workload = WorkloadState(name, host_name, f"{self.name}-{name}",
                                 f"{self.name}-{name}")
        self.state.workloads[name] = workload
        self.save()
        netns.create(workload.netns)
        outcome = invoke.run(str(self.cni_bin / "l3fabric"), "ADD",
                             invoke.network_config(self.conflist()),
                             container_id=workload.container_id,
                             netns=netns.path(workload.netns), args=f"NAME={name}",
                             host_netns=netns.path(host.netns))
        if not outcome.ok:
            raise LabError(f"CNI ADD for {name} on {host_name} failed: {outcome.stdout.strip()}")
        workload.ips = [ip["address"].split("/")[0] for ip in outcome.document["ips"]]
        resolv = Path("/etc/netns") / workload.netns
        resolv.mkdir(parents=True, exist_ok=True)
        (resolv / "resolv.conf").write_text(f"nameserver {host.address}\n"
                                            f"search {dns_domain}\n")
        self.save()
        return workload

    def remove_workload(self, name: str) -> None:
        from cni import invoke

        workload = self.state.workloads[name]
        host = self.state.hosts[workload.host]
        outcome = invoke.run(str(self.cni_bin / "l3fabric"), "DEL",
                             invoke.network_config(self.conflist()),
                             container_id=workload.container_id,
                             netns=netns.path(workload.netns),
                             host_netns=netns.path(host.netns))
        if not outcome.ok:
            raise LabError(f"CNI DEL for {name} failed: {outcome.stdout.strip()}")
        netns.remove(workload.netns)
        shutil.rmtree(Path("/etc/netns") / workload.netns, ignore_errors=True)
        del self.state.workloads[name]
        self.save()

    def ping(self, source_netns: str, target: str, count: int = 1,
             timeout: float = 1.0) -> bool:
        result = subprocess.run(["ip", "netns", "exec", source_netns, "ping", "-c", str(count),
                                 "-W", str(timeout), "-q", target],
                                capture_output=True, check=False,
                                timeout=count * timeout + 10)
        return result.returncode == 0

    def matrix(self) -> dict[str, dict[str, bool]]:
        """Ping every workload from every other one, in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        workloads = list(self.state.workloads.values())
        pairs = [(a, b) for a in workloads for b in workloads if a.name != b.name and b.ips]
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(
                lambda pair: self.ping(pair[0].netns, pair[1].ips[0], count=2), pairs))
        out: dict[str, dict[str, bool]] = {w.name: {} for w in workloads}
        for (a, b), ok in zip(pairs, results, strict=True):
            out[a.name][b.name] = ok
        return out

    # -- teardown ----------------------------------------------------------------------
    def down(self) -> list[str]:
        """Remove every namespace, process and file of the lab. Safe to repeat."""
        removed: list[str] = []
        pids = [h.agent_pid for h in self.state.hosts.values() if h.agent_pid]
        if self.state.peer:
            pids += self.state.peer.pids
        for pid in pids:
            kill_pid(pid, timeout=5)
        namespaces = netns.names(f"{self.name}-")
        for ns in namespaces:  # anything left running inside our namespaces
            for pid in netns.pids(ns):
                kill_pid(pid, timeout=3)
        if self.state.etcd_pid:
            kill_pid(self.state.etcd_pid, timeout=5)
        for ns in namespaces:
            netns.remove(ns)
            removed.append(ns)
        for ns in namespaces:
            resolv = Path("/etc/netns") / ns
            if resolv.exists():
                shutil.rmtree(resolv, ignore_errors=True)
        shutil.rmtree(Path("/var/run/frr") / self.peer_ns, ignore_errors=True)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(str(self.dir))
        self.state = LabState(self.name)
        return removed


def all_labs(base_dir: Path = BASE_DIR) -> list[str]:
    found = set()
    if base_dir.exists():
        found |= {p.name for p in base_dir.iterdir() if (p / "state.json").exists()}
    return sorted(found)
