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
namespaces by prefix and processes by the PIDs it recorded (never by name). Several
processes change that file (two `fabricctl lab restart-agent` at once, the agents'
supervisors): every change is a read-modify-write under a lock (`Lab.locked`).
etcd also listens on a unix socket in the lab directory so tools outside the
namespaces (fabricctl, tests) can reach it.

Each host's agent runs under a supervisor, the lab's stand-in for systemd on a real
host (vagrant/fabric-agent.service: Restart=on-failure): an agent that crashes or is
killed with a signal other than SIGTERM, SIGINT, SIGHUP or SIGPIPE is started again
after a back-off. What the lab does on purpose (`stop_agent`, `restart_agent`,
`kill_host`, `down`) first ends the supervision, so it is never undone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fabric import logs, sockets
from fabric.kernel import netns
from fabric.lab.etcd import EtcdServer
from fabric.processes import is_running, kill_pid, kill_pids

BASE_DIR = Path("/run/l3fabric-lab")
DEFAULT_UNDERLAY = "10.99.0.0/24"
DEFAULT_UNDERLAY6 = "fd99::/64"
FIRST_RESERVED = 241  # underlay .241 and up: etcd members, the external peer, the router
IP_FAMILIES = {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,12}$")  # fits `p-NAME` in 15 characters
# What systemd's Restart=on-failure counts as a clean end: no restart after these.
CLEAN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)
RESTART_DELAY = 1.0  # first back-off, doubled per quick failure
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 60.0  # an agent up this long has its back-off reset
SUPERVISOR_MODULE = "fabric.lab.topology"  # run with -m: see main() at the end
AGENT = "fabric-agent"


class LabError(RuntimeError):
    pass


# What a client sees from an agent that is starting, or dying while a new one starts:
# refused or reset connections, a connection closed before the whole answer.
NOT_READY: tuple[type[Exception], ...] = (
    sockets.AgentUnreachable, sockets.AgentError, ConnectionError, EOFError, ValueError)


@dataclass
class HostState:
    name: str
    netns: str
    address: str  # IPv4, or IPv6 on an IPv6-only lab (the node's identity)
    run_dir: str
    agent_pid: int | None = None
    asn: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    agent_args: list[str] = field(default_factory=list)
    alive: bool = True
    supervisor_pid: int | None = None
    wanted: bool = True  # False once stopped on purpose (systemd: inactive, not failed)
    restarts: int = 0  # by the supervisor, after the agent died
    last_exit: str | None = None  # how the agent last ended, e.g. "killed by SIGKILL"
    address6: str = ""  # its IPv6 underlay address, when the lab has IPv6

    @property
    def ipv4(self) -> str:
        return "" if ":" in self.address else self.address

    @property
    def ipv6(self) -> str:
        return self.address6 or (self.address if ":" in self.address else "")


@dataclass
class WorkloadState:
    name: str  # NS/NAME for workloads made with a namespace, else hN-wM
    host: str
    netns: str
    container_id: str
    ips: list[str] = field(default_factory=list)
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    server_pid: int | None = None  # fabric/lab/server.py: TCP and UDP on 80 and 81


@dataclass
class PeerState:
    kind: str  # bird or frr
    netns: str
    address: str  # IPv4, or IPv6 on an IPv6-only lab
    asn: int
    pids: list[int] = field(default_factory=list)
    run_dir: str = ""
    role: str = "rr"
    address6: str = ""  # beside an IPv4 address, on a dual-stack lab

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.address, self.address6) if a]

    @property
    def router_id(self) -> str:
        """BIRD's and FRR's identifier: the IPv4 address, or on an IPv6-only lab the
        low 32 bits of the IPv6 one (as the agents derive theirs)."""
        if ":" not in self.address:
            return self.address
        return str(ipaddress.IPv4Address(int(ipaddress.IPv6Address(self.address)) & 0xFFFFFFFF))

    @property
    def ipv6(self) -> str:
        return self.address6 or (self.address if ":" in self.address else "")


@dataclass
class EtcdMember:
    """One member of the lab's etcd cluster (`lab up --etcd-members 3`), in a namespace
    of its own on the underlay, so that killing it is a real member going away."""

    name: str  # etcd-1, etcd-2, ...
    netns: str
    address: str
    pid: int | None = None


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
    underlay6: str = ""
    families: list[int] = field(default_factory=lambda: [4])
    etcd_members: list[EtcdMember] = field(default_factory=list)  # empty: one etcd

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LabState:
        state = cls(doc["name"], doc.get("underlay", DEFAULT_UNDERLAY), doc.get("etcd_pid"),
                    created_at=doc.get("created_at", 0.0), complete=doc.get("complete", False),
                    underlay6=doc.get("underlay6", ""), families=doc.get("families", [4]))
        state.hosts = {k: _record(HostState, v) for k, v in doc.get("hosts", {}).items()}
        state.workloads = {k: _record(WorkloadState, v)
                           for k, v in doc.get("workloads", {}).items()}
        state.peer = _record(PeerState, doc["peer"]) if doc.get("peer") else None
        state.etcd_members = [_record(EtcdMember, m) for m in doc.get("etcd_members", [])]
        return state


def _record(kind: Any, doc: dict[str, Any]) -> Any:
    """A state record from JSON, ignoring fields it does not know: a state file written
    by a newer fabricctl must not make an older one think the lab is gone."""
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in doc.items() if k in known})


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
        self.base_dir = base_dir
        self.dir = base_dir / name
        self.state_path = self.dir / "state.json"
        self.lock_path = self.dir / "state.lock"
        self.log = logs.get("lab", lab=name)
        self.state = self._load() or LabState(name)
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._depth = 0
        self._etcd_members_started: dict[str, EtcdServer] = {}

    # -- state -------------------------------------------------------------------------
    def _load(self) -> LabState | None:
        try:
            return LabState.from_dict(json.loads(self.state_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def refresh(self) -> LabState:
        """Re-read state.json: supervisors and other fabricctl processes change it.
        No lock needed to read: every write replaces the file in one rename."""
        self.state = self._load() or self.state
        return self.state

    @contextlib.contextmanager
    def locked(self) -> Iterator[LabState]:
        """The lab's state for a read-modify-write, written back when the block ends.

        Two fabricctl processes that each read the file, changed their own host and
        wrote it back used to lose one of the changes (and with it an agent's PID, so a
        later restart left two agents for one node). Here the file is re-read under an
        exclusive flock on `state.lock`, held until the new state is written; the
        block also runs when it raises, so whatever was made is still recorded.
        Re-entrant for one Lab object (an flock is per open file, so a second open
        in the same process would wait for itself).
        """
        with self._mutex:
            if self._depth == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
                self.refresh()
            self._depth += 1
            try:
                yield self.state
            finally:
                self._depth -= 1
                if self._depth == 0:
                    try:
                        if self.dir.exists():  # down() removes the directory
                            self._write()
                    finally:
                        assert self._lock_fd is not None
                        os.close(self._lock_fd)  # releases the flock
                        self._lock_fd = None

    def _write(self) -> None:
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        os.replace(tmp, self.state_path)

    def mark_complete(self) -> None:
        with self.locked() as state:
            state.complete = True

    @property
    def exists(self) -> bool:
        return self.state_path.exists() or bool(netns.names(f"{self.name}-"))

    @property
    def net_ns(self) -> str:
        return f"{self.name}-net"

    def _address(self, index: int) -> str:
        network = ipaddress.ip_network(self.state.underlay)
        return str(network.network_address + index)

    def _address6(self, index: int) -> str:
        network = ipaddress.ip_network(self.state.underlay6 or DEFAULT_UNDERLAY6)
        return str(network.network_address + index)

    @property
    def router(self) -> str:
        return self._address(254)

    @property
    def router6(self) -> str:
        return self._address6(254)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.state.underlay).prefixlen

    @property
    def prefixlen6(self) -> int:
        return ipaddress.ip_network(self.state.underlay6 or DEFAULT_UNDERLAY6).prefixlen

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(self.state.families)

    @property
    def etcd_endpoint(self) -> str:
        """How agents reach etcd: over the underlay, like real hosts (over IPv6 in an
        IPv6-only lab); every member of a cluster."""
        members = self.state.etcd_members
        hosts = [m.address for m in members] if members else \
            [self.router if 4 in self.families else self.router6]
        return ",".join(f"http://{_url(h)}:{ETCD_CLIENT_PORT}" for h in hosts)

    @property
    def etcd_local_endpoint(self) -> str:
        """How tools outside the namespaces reach etcd: its unix sockets."""
        dirs = [self.dir / m.name for m in self.state.etcd_members] or [self.dir / "etcd"]
        return ",".join(f"unix://{d}/etcd:{ETCD_CLIENT_PORT}" for d in dirs)

    # -- underlay and etcd -------------------------------------------------------------
    def create_underlay(self, underlay: str = DEFAULT_UNDERLAY,
                        families: tuple[int, ...] = (4,),
                        underlay6: str = DEFAULT_UNDERLAY6) -> None:
        """The lab's network: a bridge with the router's addresses of each family."""
        with self.locked() as state:
            state.underlay = underlay
            state.underlay6 = underlay6 if 6 in families else ""
            state.families = list(families)
        netns.create(self.net_ns)
        _ip("-n", self.net_ns, "link", "add", "br0", "type", "bridge")
        if 4 in families:
            _ip("-n", self.net_ns, "addr", "add", f"{self.router}/{self.prefixlen}", "dev",
                "br0")
        if 6 in families:
            _ip("-n", self.net_ns, "addr", "add", f"{self.router6}/{self.prefixlen6}", "dev",
                "br0", "nodad")
        _ip("-n", self.net_ns, "link", "set", "br0", "up")

    def start_etcd(self, members: int = 1) -> None:
        """One etcd on the router, or a cluster of `members`, each in its own namespace."""
        if members > 1:
            self._start_cluster(members)
            return
        host = self.router if 4 in self.families else self.router6
        server = EtcdServer.start(self.dir / "etcd", host=host, port=ETCD_CLIENT_PORT,
                                  peer_port=ETCD_PEER_PORT, netns=self.net_ns,
                                  name=f"{self.name}-etcd")
        with self.locked() as state:
            state.etcd_pid = server.pid

    def _start_cluster(self, count: int) -> None:
        members = []
        for index in range(1, count + 1):
            address = self._address(FIRST_RESERVED - 1 + index) if 4 in self.families \
                else self._address6(FIRST_RESERVED - 1 + index)
            member = EtcdMember(f"etcd-{index}", f"{self.name}-etcd{index}", address)
            netns.create(member.netns)
            self.plug(member.netns, f"p-etcd{index}", address, default_route=False)
            members.append(member)
        with self.locked() as state:
            state.etcd_members = members
        for member in members:  # all started before any can be ready (quorum)
            self._start_member(member, wait=False)
        for member in members:
            self._member_server(member).wait_ready()

    def _cluster(self) -> str:
        return ",".join(f"{m.name}=http://{_url(m.address)}:{ETCD_PEER_PORT}"
                        for m in self.state.etcd_members)

    def _member_server(self, member: EtcdMember) -> EtcdServer:
        return self._etcd_members_started[member.name]

    def _start_member(self, member: EtcdMember, wait: bool = True) -> None:
        server = EtcdServer.start(self.dir / member.name, host=member.address,
                                  port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT,
                                  netns=member.netns, name=member.name,
                                  cluster=self._cluster(), wait=wait)
        self._etcd_members_started[member.name] = server
        with self.locked() as state:
            for recorded in state.etcd_members:
                if recorded.name == member.name:
                    recorded.pid = server.pid

    def kill_etcd(self, name: str) -> int:
        """An etcd member dies (kill -9); returns how many members still run (a
        majority of them keeps the cluster going)."""
        member = self._member(name)
        if not member.pid or not is_running(member.pid):
            raise LabError(f"{name} is not running (`lab restart-etcd {name}` starts it)")
        kill_pid(member.pid, timeout=5, sig=signal.SIGKILL)
        with self.locked() as state:
            for recorded in state.etcd_members:
                if recorded.name == name:
                    recorded.pid = None
            return sum(1 for m in state.etcd_members if m.pid and is_running(m.pid))

    def restart_etcd(self, name: str) -> None:
        """A member comes back with its data: it rejoins and catches up."""
        member = self._member(name)
        if member.pid and is_running(member.pid):
            raise LabError(f"{name} is running (pid {member.pid})")
        self._start_member(member)

    def _member(self, name: str) -> EtcdMember:
        for member in self.refresh().etcd_members:
            if member.name == name:
                return member
        known = ", ".join(m.name for m in self.state.etcd_members) or "none (one etcd)"
        raise LabError(f"lab {self.name} has no etcd member {name} (members: {known})")

    def _port(self, host: str) -> str:
        """The bridge port of a host in the underlay namespace (15 characters at most)."""
        return f"p-{host}"[:15]

    def plug(self, ns: str, port: str, address: str, default_route: bool = True,
             address6: str = "") -> None:
        """Connect a namespace to the underlay bridge as `eth0` with its addresses (an
        IPv6 `address` on an IPv6-only lab, or `address6` beside an IPv4 one)."""
        _ip("-n", self.net_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", self.net_ns, "link", "set", port, "master", "br0", "up")
        addresses = [a for a in (address, address6) if a]
        for addr in addresses:
            if ":" in addr:
                _ip("-n", ns, "addr", "add", f"{addr}/{self.prefixlen6}", "dev", "eth0", "nodad")
            else:
                _ip("-n", ns, "addr", "add", f"{addr}/{self.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        for addr in addresses if default_route else ():
            if ":" in addr:
                _ip("-n", ns, "-6", "route", "add", "default", "via", self.router6)
            else:
                _ip("-n", ns, "route", "add", "default", "via", self.router)

    # -- hosts -------------------------------------------------------------------------
    def add_host(self, name: str, *, asn: int | None = None,
                 labels: dict[str, str] | None = None, rr_cluster_id: str | None = None,
                 agent_args: list[str] | None = None, start: bool = True) -> HostState:
        if not HOST_NAME.match(name):
            raise LabError(f"host name {name!r}: use 1 to 13 lower-case letters, digits or "
                           "'-' (namespace and interface names are built from it)")
        with self.locked() as state:
            if name in state.hosts:
                raise LabError(f"lab {self.name} already has a host {name}")
            index = self._host_index(name, state)
            families = state.families
            address6 = self._address6(index) if 6 in families else ""
            address = self._address(index) if 4 in families else address6
            host = HostState(name, f"{self.name}-{name}", address,
                             str(self.dir / name), asn=asn, labels=dict(labels or {}),
                             rr_cluster_id=rr_cluster_id, agent_args=list(agent_args or []),
                             address6=address6 if 4 in families else "")
            state.hosts[name] = host
        netns.create(host.netns)
        self.plug(host.netns, self._port(name), host.address, address6=host.address6)
        if start:
            self.start_agent(name)
        if self.state.peer:
            self.refresh_peer()
        return host

    def _host_index(self, name: str, state: LabState) -> int:
        """The host's place on the underlay: hN is .(10+N) whenever that is free (hosts
        built in parallel keep the address their name promises), others the first free.
        .241 and up belong to etcd members, the peer and the router."""
        taken = {a for h in state.hosts.values() for a in (h.address, h.address6)}

        def free(index: int) -> bool:
            return self._address(index) not in taken and self._address6(index) not in taken

        number = re.fullmatch(r"h(\d+)", name)
        if number and 10 + int(number[1]) < FIRST_RESERVED and free(10 + int(number[1])):
            return 10 + int(number[1])
        index = 11
        while not free(index):
            index += 1
        size = ipaddress.ip_network(state.underlay).num_addresses
        if index >= min(FIRST_RESERVED, size - 1):
            raise LabError(f"no underlay address left for host {name}: hosts use .11 to "
                           f".{FIRST_RESERVED - 1} of {state.underlay}")
        return index

    def agent_argv(self, host: HostState) -> list[str]:
        argv = [python_bin("fabric-agent"), "--node-name", host.name]
        if host.ipv4:
            argv += ["--node-address", host.ipv4]
        if host.ipv6:
            argv += ["--node-address6", host.ipv6]
        argv += ["--etcd-endpoints", self.etcd_endpoint, "--run-dir", host.run_dir,
                 "--config", "/dev/null"]
        if host.asn:
            argv += ["--asn", str(host.asn)]
        if host.labels:
            argv += ["--labels", ",".join(f"{k}={v}" for k, v in host.labels.items())]
        if host.rr_cluster_id:
            argv += ["--rr-cluster-id", host.rr_cluster_id]
        return argv + host.agent_args

    def start_agent(self, name: str) -> int:
        """Start the host's agent under its supervisor; returns the agent's PID."""
        with self.locked() as state:
            host = state.hosts[name]
            if host.supervisor_pid and is_running(host.supervisor_pid):
                raise LabError(f"the agent of {name} is already running under supervisor "
                               f"pid {host.supervisor_pid} (lab restart-agent restarts it)")
            self._launch_supervisor(host)
        return self._wait_recorded(name)

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop the host's agent on purpose: its supervisor goes first, so the agent
        stays stopped."""
        with self.locked() as state:
            host = state.hosts[name]
            self._end_supervision(host)
            if still_ours(host.agent_pid, AGENT):
                kill_pid(host.agent_pid, sig=sig)
            host.agent_pid = None
            host.wanted = False

    def restart_agent(self, name: str, sig: int = signal.SIGTERM) -> tuple[int | None, int]:
        """Stop the agent with `sig` and start a new one: (old PID, new PID).

        Stop and start happen under one lock, so two restarts of the same host at once
        end with one agent, not two."""
        with self.locked() as state:
            host = state.hosts[name]
            old = host.agent_pid
            self.stop_agent(name, sig)
            self._launch_supervisor(host)
        return old, self._wait_recorded(name)

    def _launch_supervisor(self, host: HostState) -> None:
        """Start the supervisor of `host` (call under `locked`, which records its PID)."""
        Path(host.run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(host.run_dir) / "agent.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", SUPERVISOR_MODULE, "supervise", self.name,
                 host.name, str(self.base_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        host.supervisor_pid = process.pid
        host.agent_pid = None
        host.alive = host.wanted = True

    def _end_supervision(self, host: HostState) -> None:
        """Stop the supervisor of `host` (call under `locked`). Once its PID is gone
        from the state it starts nothing more, even if it outlived the signal."""
        pid, host.supervisor_pid = host.supervisor_pid, None
        if still_ours(pid, SUPERVISOR_MODULE):
            kill_pid(pid, timeout=5)

    def _wait_recorded(self, name: str, timeout: float = 15.0) -> int:
        """The PID of the agent a new supervisor started (it records it in the state)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            host = self.refresh().hosts[name]
            if host.agent_pid:
                return host.agent_pid
            if not (host.supervisor_pid and is_running(host.supervisor_pid)):
                raise LabError(f"the supervisor of {name}'s agent exited; "
                               f"see {host.run_dir}/agent.log")
            time.sleep(0.05)
        raise LabError(f"the agent of {name} was not started after {timeout:.0f}s; "
                       f"see {host.run_dir}/agent.log")

    def call(self, name: str, method: str, **params: Any) -> Any:
        """One request to a host's agent, through the host's network namespace."""
        return sockets.call(sockets.CONTROL_SOCKET, method,
                            netns=netns.path(self.state.hosts[name].netns), **params)

    def wait_agent(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the host's agent answers on its control socket.

        An agent that is starting, or one that was just killed and is being replaced,
        refuses the connection, resets it or closes it half-way: all mean "not yet".
        An agent that exits while we wait is reported at once, with how it ended.
        """
        host = self.refresh().hosts[name]
        restarts = host.restarts
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            host = self.refresh().hosts[name]
            if host.restarts > restarts:
                raise LabError(f"agent of {name} exited ({host.last_exit}) and is being "
                               f"restarted; see {host.run_dir}/agent.log")
            if not is_up(host):
                raise LabError(f"agent of {name} is not running (last exit: "
                               f"{host.last_exit or 'none'}); see {host.run_dir}/agent.log")
            try:
                return self.call(name, "status")
            except NOT_READY as exc:
                last = exc
                time.sleep(0.1)
        raise LabError(f"agent of {name} not answering after {timeout:.0f}s: {last}; "
                       f"see {host.run_dir}/agent.log")

    def kill_host(self, name: str) -> None:
        """A host dies: its underlay link goes down first (no goodbye reaches the peers),
        then everything running in its namespaces is killed, supervisor first (a dead
        host restarts nothing)."""
        with self.locked() as state:
            host = state.hosts[name]
            self._end_supervision(host)
            port = self._port(name)
            with contextlib.suppress(LabError):
                _ip("-n", self.net_ns, "link", "set", port, "down")
            for ns in [host.netns] + [w.netns for w in state.workloads.values()
                                      if w.host == name]:
                for pid in netns.pids(ns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if still_ours(host.agent_pid, AGENT):
                kill_pid(host.agent_pid, timeout=2, sig=signal.SIGKILL)
            host.agent_pid = None
            host.alive = False

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
        address6 = self._address6(253) if 6 in self.families else ""
        address = self._address(253) if 4 in self.families else address6
        peer = PeerState(kind, self.peer_ns, address, asn, run_dir=str(self.dir / "peer"),
                         role=role, address6=address6 if 4 in self.families else "")
        with self.locked() as state:
            state.peer = peer
        netns.create(peer.netns)
        self.plug(peer.netns, "p-peer", peer.address, address6=peer.address6)
        _ip("netns", "exec", peer.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _ip("netns", "exec", peer.netns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        with self.locked() as state:
            peer.pids = self._start_peer_daemon(peer)
            state.peer = peer
        store = self.store()
        try:
            store.put(fabric_keys.BGP_CONFIG, BgpConfig(fabric_asn, node_mesh=False).to_record())
            for address in peer.addresses:  # a session per family
                suffix = "-6" if ":" in address and len(peer.addresses) > 1 else ""
                spec = PeerSpec(f"lab-{kind}{suffix}", address, asn,
                                route_reflector=role == "rr")
                store.put(fabric_keys.bgp_peer(spec.name), spec.to_record())
        finally:
            store.close()
        return peer

    def _neighbors(self, fabric_asn: int = 64512) -> list[Any]:
        """The external speaker's sessions: one per host and family."""
        from fabric.lab.peers import Neighbor
        found = []
        for host in self.state.hosts.values():
            if host.ipv4:
                found.append(Neighbor(host.name, host.ipv4, host.asn or fabric_asn))
            if host.ipv6:
                found.append(Neighbor(f"{host.name}_6", host.ipv6, host.asn or fabric_asn))
        return found

    def _start_peer_daemon(self, peer: PeerState) -> list[int]:
        from fabric.lab.peers import Bird, Frr, bird_config, frr_config

        run_dir = Path(peer.run_dir)
        if peer.kind == "bird":
            return [Bird(peer.netns, run_dir).start(
                bird_config(peer.router_id, peer.asn, self._neighbors(), peer.role,
                            local6=peer.ipv6))]
        return Frr(peer.netns, run_dir, peer.netns).start(
            frr_config(peer.router_id, peer.asn, self._neighbors(), peer.role,
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
                bird_config(peer.router_id, peer.asn, self._neighbors(), peer.role,
                            local6=peer.ipv6))
            return
        frr = Frr(peer.netns, run_dir, peer.netns)
        commands = ["configure terminal", f"router bgp {peer.asn}"]
        for neighbor in self._neighbors():
            family = 6 if ":" in neighbor.address else 4
            commands += [f"neighbor {neighbor.address} remote-as {neighbor.asn}",
                         f"neighbor {neighbor.address} timers 3 9",
                         f"address-family ipv{family} unicast",
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
        return conflist("lab", families=self.families)

    def install_cni(self) -> None:
        from cni.install import install
        install(str(self.cni_bin), str(self.dir / "cni" / "net.d"), network="lab",
                families=self.families)

    def add_workload(self, host_name: str, name: str | None = None,
                     dns_domain: str = "fabric.internal", namespace: str | None = None,
                     labels: dict[str, str] | None = None, serve: bool = False
                     ) -> WorkloadState:
        """A namespace attached to `host_name` through the real CNI plugin.

        With `namespace`, the workload is NAMESPACE/NAME for network policy (CNI_ARGS
        K8S_POD_NAMESPACE and K8S_POD_NAME, as kubelet sends them) and `labels` go in
        the configuration's runtimeConfig. With `serve`, it runs the lab's TCP and UDP
        servers on ports 80 and 81 (`fabric.lab.server`)."""
        from cni import invoke

        if not (self.cni_bin / "l3fabric").exists():
            self.install_cni()
        with self.locked() as state:
            host = state.hosts[host_name]
            count = sum(1 for w in state.workloads.values() if w.host == host_name)
            name = name or f"{host_name}-w{count + 1}"
            key = f"{namespace}/{name}" if namespace else name
            if key in state.workloads:
                raise LabError(f"lab {self.name} already has a workload {key}")
            flat = key.replace("/", "-")
            workload = WorkloadState(key, host_name, f"{self.name}-{flat}",
                                     f"{self.name}-{flat}", namespace=namespace or "",
                                     labels=dict(labels or {}))
            state.workloads[key] = workload
        netns.create(workload.netns)
        args = f"NAME={name}"
        config = invoke.network_config(self.conflist())
        if namespace:
            args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
            config["runtimeConfig"] = {"labels": dict(labels or {})}
        if serve:
            self._start_server(workload)
        outcome = invoke.run(str(self.cni_bin / "l3fabric"), "ADD", config,
                             container_id=workload.container_id,
                             netns=netns.path(workload.netns), args=args,
                             host_netns=netns.path(host.netns))
        if not outcome.ok:
            raise LabError(f"CNI ADD for {name} on {host_name} failed: {outcome.stdout.strip()}")
        ips = [ip["address"].split("/")[0] for ip in outcome.document["ips"]]
        resolv = Path("/etc/netns") / workload.netns
        resolv.mkdir(parents=True, exist_ok=True)
        (resolv / "resolv.conf").write_text(f"nameserver {host.address}\n"
                                            f"search {dns_domain}\n")
        with self.locked() as state:
            workload = state.workloads[key]
            workload.ips = ips
        return workload

    def _start_server(self, workload: WorkloadState) -> None:
        """The workload's servers, listening before its CNI ADD (so before any probe)."""
        from fabric.lab import server

        process = subprocess.Popen(
            ["ip", "netns", "exec", workload.netns, sys.executable, "-I", "-S",
             server.__file__], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, start_new_session=True)
        with self.locked() as state:
            state.workloads[workload.name].server_pid = process.pid
        workload.server_pid = process.pid
        assert process.stdout is not None
        line = process.stdout.readline()  # "ready", or EOF if it died
        process.stdout.close()
        if line.strip() != b"ready":
            raise LabError(f"the servers of {workload.name} did not start")

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
        if workload.server_pid and still_ours(workload.server_pid, "server.py"):
            kill_pid(workload.server_pid, timeout=3)
        netns.remove(workload.netns)
        shutil.rmtree(Path("/etc/netns") / workload.netns, ignore_errors=True)
        with self.locked() as state:
            state.workloads.pop(name, None)

    def ping(self, source_netns: str, target: str, count: int = 1,
             timeout: float = 1.0) -> bool:
        result = subprocess.run(["ip", "netns", "exec", source_netns, "ping", "-c", str(count),
                                 "-W", str(timeout), "-q", target],
                                capture_output=True, check=False,
                                timeout=count * timeout + 10)
        return result.returncode == 0

    def matrix(self, family: int = 4, sample: bool = False) -> dict[str, dict[str, bool]]:
        """Ping every workload's address of `family` from every other one, in parallel;
        or (`sample`) from each to two others on other hosts, so that every workload, and
        so every host, is a source and a destination twice: 2N pings instead of N^2."""
        from concurrent.futures import ThreadPoolExecutor

        def address(workload: WorkloadState) -> str:
            return next((ip for ip in workload.ips if (":" in ip) == (family == 6)), "")

        workloads = list(self.state.workloads.values())
        if sample:
            pairs = sample_pairs(workloads)
        else:
            pairs = [(a, b) for a in workloads for b in workloads if a.name != b.name]
        pairs = [(a, b) for a, b in pairs if address(b)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(
                lambda pair: self.ping(pair[0].netns, address(pair[1]), count=2), pairs))
        out: dict[str, dict[str, bool]] = {w.name: {} for w in workloads}
        for (a, b), ok in zip(pairs, results, strict=True):
            out[a.name][b.name] = ok
        return out

    def probe(self, port: int = 80, protocol: str = "tcp", timeout: float = 3.0,
              sources: list[str] | None = None, family: int = 4
              ) -> dict[str, dict[str, bool]]:
        """Connect from every workload to every other one's address of `family` on
        `port`/`protocol` (TCP connect and read, or a UDP datagram and its answer), all
        at once; from -> to -> answered. Denied traffic is rejected, so answers come
        fast either way; `timeout` only bounds a lost packet."""
        from concurrent.futures import ThreadPoolExecutor

        def address(workload: WorkloadState) -> str:
            return next((ip for ip in workload.ips if (":" in ip) == (family == 6)), "")

        workloads = list(self.state.workloads.values())
        chosen = [w for w in workloads if sources is None or w.name in sources]
        pairs = [(a, b) for a in chosen for b in workloads if a.name != b.name and address(b)]
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(pairs)))) as pool:
            results = list(pool.map(
                lambda pair: connects(netns.path(pair[0].netns), address(pair[1]), port,
                                      protocol, timeout), pairs))
        out: dict[str, dict[str, bool]] = {w.name: {} for w in chosen}
        for (a, b), ok in zip(pairs, results, strict=True):
            out[a.name][b.name] = ok
        return out

    # -- teardown ----------------------------------------------------------------------
    def down(self) -> list[str]:
        """Remove every namespace, process and file of the lab. Safe to repeat.

        Supervisors go first, under the state lock, so none restarts an agent that is
        being stopped."""
        exists = self.dir.exists()
        with self.locked() if exists else contextlib.nullcontext(self.state) as state:
            removed = self._remove(state)
        self.state = LabState(self.name)
        return removed

    def _remove(self, state: LabState) -> list[str]:
        """Everything at once, not host by host: supervisors, then agents and speakers,
        then whatever else runs in our namespaces, then etcd and the namespaces."""
        removed: list[str] = []
        supervisors = [h.supervisor_pid for h in state.hosts.values()
                       if still_ours(h.supervisor_pid, SUPERVISOR_MODULE)]
        for host in state.hosts.values():
            host.supervisor_pid = None
        kill_pids([p for p in supervisors if p], timeout=5)
        pids = [h.agent_pid for h in state.hosts.values() if still_ours(h.agent_pid, AGENT)]
        if state.peer:
            pids += state.peer.pids
        kill_pids([p for p in pids if p], timeout=5)
        namespaces = netns.names(f"{self.name}-")
        # Anything left running inside our namespaces (workload servers, a stray agent).
        kill_pids([pid for ns in namespaces for pid in netns.pids(ns)], timeout=3)
        etcds = [m.pid for m in state.etcd_members if m.pid] + \
            ([state.etcd_pid] if state.etcd_pid else [])
        kill_pids(etcds, timeout=5)
        netns.remove_many(namespaces)
        removed += namespaces
        for ns in namespaces:
            resolv = Path("/etc/netns") / ns
            if resolv.exists():
                shutil.rmtree(resolv, ignore_errors=True)
        shutil.rmtree(Path("/var/run/frr") / self.peer_ns, ignore_errors=True)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(str(self.dir))
        return removed


def _url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def sample_pairs(workloads: list[WorkloadState]) -> list[tuple[WorkloadState, WorkloadState]]:
    """Each workload to the next and to the one half the hosts further round a ring that
    takes the hosts in turn (h1-w1, h2-w1, ..., h1-w2, ...): those sit on other hosts,
    and every workload is a source twice and a destination twice."""
    by_host: dict[str, list[WorkloadState]] = {}
    for workload in sorted(workloads, key=lambda w: w.name):
        by_host.setdefault(workload.host, []).append(workload)
    ring = [w for turn in range(max((len(v) for v in by_host.values()), default=0))
            for ws in by_host.values() if turn < len(ws) for w in [ws[turn]]]
    count, hosts = len(ring), len(by_host)
    if count < 2:
        return []
    # Offsets smaller than the number of hosts land on another host of the round.
    offsets = {1, max(1, hosts // 2)} if hosts > 1 else {1}
    pairs = {(ring[i].name, ring[(i + k) % count].name) for i in range(count) for k in offsets}
    named = {w.name: w for w in ring}
    return [(named[a], named[b]) for a, b in sorted(pairs) if a != b]


NEIGH = "/proc/sys/net/ipv{family}/neigh/default/gc_thresh{level}"


DEFAULT_GC_THRESH3 = 1024  # the kernel's default hard limit of the neighbour table


def size_neighbour_tables(hosts: int, per_host: int, families: Iterable[int]) -> list[str]:
    """Raise the kernel's neighbour-table thresholds for a lab of this size; what changed.

    The table is one for every network namespace (gc_thresh3 = 1024 by default): a full
    mesh of N hosts needs about N^2 entries between the hosts alone, and past the limit
    every lab on the machine fails ("neighbor table overflow", "No buffer space
    available"). Only ever raised, never lowered, and only in the initial namespace.
    """
    need = hosts * hosts + 4 * hosts + 2 * hosts * per_host + 256
    changes = []
    for family in families:
        wanted = {1: min(need // 4, 8192), 2: need, 3: need * 2}
        for level in (3, 2, 1):  # the hard limit first: 1 <= 2 <= 3 at every step
            path = Path(NEIGH.format(family=family, level=level))
            try:
                current = int(path.read_text())
            except (OSError, ValueError):
                if not path.parent.parent.parent.exists():
                    continue  # no such family here (IPv6 disabled)
                if level == 3 and need > DEFAULT_GC_THRESH3:
                    # The thresholds exist in the initial network namespace only; from
                    # any other (a container, a CI runner) they can be neither read nor
                    # raised, though the one table they size is still the machine's.
                    raise LabError(
                        f"a lab of {hosts} hosts needs about {need} neighbour entries and "
                        "the thresholds cannot be read or raised from this network "
                        "namespace; as root in the initial namespace run: sysctl -w "
                        + " ".join(f"net.ipv{family}.neigh.default.gc_thresh{n}={wanted[n]}"
                                   for n in (3, 2, 1))) from None
                continue
            if current >= wanted[level]:
                continue
            try:
                path.write_text(str(wanted[level]))
            except OSError as exc:
                raise LabError(
                    f"the neighbour table is too small for {hosts} hosts and cannot be "
                    f"raised here ({exc.strerror}): as root in the initial network "
                    f"namespace, sysctl -w net.ipv{family}.neigh.default.gc_thresh{level}"
                    f"={wanted[level]}") from exc
            changes.append(f"raised {path} from {current} to {wanted[level]} "
                           f"(a lab of {hosts} hosts needs about {need} entries)")
    return changes


def connects(netns_path: str, address: str, port: int, protocol: str = "tcp",
             timeout: float = 3.0, attempts: int = 2) -> bool:
    """Whether a connection from inside `netns_path` to `address`:`port` is answered
    (the lab's servers answer `ok`)."""
    return probe(netns_path, address, port, protocol, timeout, attempts) == "answered"


def probe(netns_path: str, address: str, port: int, protocol: str = "tcp",
          timeout: float = 3.0, attempts: int = 2) -> str:
    """`answered`, `refused` (reset, ICMP unreachable or prohibited: a definite no) or
    `timeout` (nothing came back: a lost packet, or a drop). The socket is made inside
    the namespace (only the calling thread enters it) and keeps to it."""
    import socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    for _ in range(attempts if protocol == "udp" else 1):
        with netns.entered(netns_path):
            sock = socket.socket(family, kind)
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
            if kind == socket.SOCK_DGRAM:
                sock.send(b"probe")
            return "answered" if sock.recv(16).startswith(b"ok") else "refused"
        except TimeoutError:
            continue  # a lost datagram: once more
        except OSError:
            return "refused"
        finally:
            sock.close()
    return "timeout"


def all_labs(base_dir: Path = BASE_DIR) -> list[str]:
    found = set()
    if base_dir.exists():
        found |= {p.name for p in base_dir.iterdir() if (p / "state.json").exists()}
    return sorted(found)


def still_ours(pid: int | None, marker: str) -> bool:
    """Whether `pid` still runs the program we recorded (a word of its command line
    ends with `marker`). A PID in the state file can outlive its process, and the
    kernel gives it to another one: that one must not get our signal."""
    if not pid:
        return False
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(word.decode(errors="replace").endswith(marker) for word in words)


def is_up(host: HostState) -> bool:
    """Whether the host's agent runs, or a supervisor that will start it again."""
    return any(pid and is_running(pid) for pid in (host.agent_pid, host.supervisor_pid))


# -- the supervisor ------------------------------------------------------------------------
def exit_reason(returncode: int) -> str:
    """How a process ended, in words (Popen's negative return code is a signal)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def restarts_after(returncode: int) -> bool:
    """systemd's Restart=on-failure, as in vagrant/fabric-agent.service: an exit status
    other than 0, or death by a signal that is not a clean stop, means restart."""
    if returncode < 0:
        return -returncode not in CLEAN_SIGNALS
    return returncode != 0


def restart_delay(quick_failures: int) -> float:
    """Back-off before the next start: 1 s, doubled per failure, at most 30 s."""
    return float(min(RESTART_DELAY * 2 ** quick_failures, RESTART_DELAY_MAX))


class Supervisor:
    """Runs one host's agent and starts it again when it dies (see the module doc).

    It starts an agent only while the state names it as the host's supervisor, and
    checks that under the state lock in the same step that records the agent's PID:
    whoever stops it on purpose clears that name under the same lock, so a stopped
    supervisor cannot slip one more agent in.
    """

    def __init__(self, lab: Lab, host: str) -> None:
        self.lab, self.host = lab, host
        self.log = logs.get("supervisor", lab=lab.name, host=host, pid=os.getpid())

    def run(self) -> int:
        quick_failures = 0
        while (process := self._start()) is not None:
            started = time.monotonic()
            returncode = process.wait()
            if time.monotonic() - started >= STABLE_AFTER:
                quick_failures = 0
            if not self._record_exit(returncode):
                return 0
            delay = restart_delay(quick_failures)
            quick_failures += 1
            self.log.warning("agent died; starting it again", agent_pid=process.pid,
                             reason=exit_reason(returncode), delay_seconds=delay)
            time.sleep(delay)
        self.log.info("no longer supervising (stopped on purpose)")
        return 0

    def _ours(self, state: LabState) -> HostState | None:
        host = state.hosts.get(self.host)
        return host if host is not None and host.supervisor_pid == os.getpid() else None

    def _start(self) -> subprocess.Popen[bytes] | None:
        with self.lab.locked() as state:
            host = self._ours(state)
            if host is None:
                return None
            Path(host.run_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(host.run_dir) / "agent.log", "ab") as log:
                process = subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, *self.lab.agent_argv(host)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            host.agent_pid = process.pid
        self.log.info("agent started", agent_pid=process.pid)
        return process

    def _record_exit(self, returncode: int) -> bool:
        """Note how the agent ended; True when it is to be started again."""
        with self.lab.locked() as state:
            host = self._ours(state)
            if host is None:
                return False
            host.last_exit = exit_reason(returncode)
            host.agent_pid = None  # a dead PID kept here could be signalled once reused
            if not restarts_after(returncode):
                host.supervisor_pid = None
                self.log.info("agent ended cleanly; not restarting", reason=host.last_exit)
                return False
            host.restarts += 1
            return True


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    """`python -m fabric.lab.topology supervise LAB HOST BASE_DIR` (the lab starts it)."""
    if len(argv) != 4 or argv[0] != "supervise":
        print("usage: python -m fabric.lab.topology supervise LAB HOST BASE_DIR",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)  # leave the agent alone: the caller handles it
    logs.configure("json", "info")
    return Supervisor(Lab(argv[1], Path(argv[3])), argv[2]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
