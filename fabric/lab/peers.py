"""BIRD 2 and FRR speakers for the lab and the tests: configs (pure) and processes.

Two roles, both tested against the agent:
* `rr`: an iBGP route reflector in the fabric's AS; every node is its client and the
  node mesh is switched off. Reflected routes keep the originating node as next hop.
* `tor`: an eBGP top-of-rack router in its own AS; each node has its own AS (AS per
  rack) and the ToR is the next hop between racks. The ToR's namespace forwards.

The configs are what docs/operations.md shows as tested examples.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PeerError(RuntimeError):
    pass


@dataclass(frozen=True)
class Neighbor:
    name: str
    address: str
    asn: int


def bird_config(router_id: str, asn: int, neighbors: Sequence[Neighbor], role: str,
                hold_time: int = 9, extra: str = "", password: str | None = None,
                local6: str = "") -> str:
    """BIRD as a route reflector (`rr`) or eBGP ToR (`tor`) for the neighbors given: a
    session per neighbor address, IPv4 routes over IPv4 sessions and IPv6 over IPv6
    ones (`local6` is BIRD's own IPv6 address for those). `router_id` is BIRD's IPv4
    address, or on an IPv6-only underlay any 32-bit identifier in IPv4 form."""
    reflector = role == "rr"
    channel = ("import all; export all; gateway direct;" if reflector
               else "import all; export all; next hop self;")
    lines = [f"router id {router_id};", "protocol device {}"]
    families = sorted({6 if ":" in n.address else 4 for n in neighbors}) or [4]
    for family in families:
        local = local6 if family == 6 else router_id
        lines += [
            f"protocol kernel {{ ipv{family} {{ import none; export all; }}; merge paths on; }}",
            f"template bgp node{family} {{",
            f"  local {local} as {asn};",
            "  direct;",
            f"  hold time {hold_time};",
            "  graceful restart on;",
        ]
        if reflector:
            lines += ["  rr client;", f"  rr cluster id {router_id};"]
        if password:
            lines.append(f'  password "{password}";')
        lines += [f"  ipv{family} {{ {channel} }};", "}"]
    for neighbor in neighbors:
        family = 6 if ":" in neighbor.address else 4
        lines.append(f"protocol bgp {neighbor.name.replace('-', '_')} from node{family} "
                     f"{{ neighbor {neighbor.address} as {neighbor.asn}; }}")
    return "\n".join(lines) + "\n" + extra


def frr_config(router_id: str, asn: int, neighbors: Sequence[Neighbor], role: str,
               log_file: str, hold_time: int = 9, password: str | None = None) -> str:
    """FRR in the same two roles: IPv4 neighbors in its IPv4 unicast address family,
    IPv6 neighbors in its IPv6 one."""
    keepalive = max(1, hold_time // 3)
    lines = ["frr defaults datacenter", "hostname l3fabric-peer", f"log file {log_file}",
             "!", f"router bgp {asn}", f" bgp router-id {router_id}",
             " no bgp ebgp-requires-policy", " no bgp default ipv4-unicast",
             " bgp graceful-restart"]
    if role == "rr":
        lines.append(f" bgp cluster-id {router_id}")
    for neighbor in neighbors:
        lines += [f" neighbor {neighbor.address} remote-as {neighbor.asn}",
                  f" neighbor {neighbor.address} timers {keepalive} {hold_time}"]
        if password:
            lines.append(f" neighbor {neighbor.address} password {password}")
    for family in (4, 6):
        members = [n for n in neighbors if (":" in n.address) == (family == 6)]
        if not members:
            continue
        lines += [" !", f" address-family ipv{family} unicast"]
        for neighbor in members:
            lines.append(f"  neighbor {neighbor.address} activate")
            if role == "rr":
                lines.append(f"  neighbor {neighbor.address} route-reflector-client")
        lines.append(" exit-address-family")
    lines += ["!", ""]
    return "\n".join(lines)


def _run(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise PeerError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()}")


def _pid_from(path: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.05)
    raise PeerError(f"no pid file {path} after {timeout:.0f}s")


class Bird:
    """One BIRD daemon in a namespace, with its own control socket and pid file."""

    def __init__(self, netns: str, run_dir: Path) -> None:
        self.netns = netns
        self.dir = run_dir
        self.socket = run_dir / "bird.ctl"
        self.pid_file = run_dir / "bird.pid"
        self.config = run_dir / "bird.conf"

    def start(self, config: str) -> int:
        if shutil.which("bird") is None:
            raise PeerError("BIRD is not installed (Debian package bird2)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(config)
        _run(["ip", "netns", "exec", self.netns, "bird", "-c", str(self.config),
              "-s", str(self.socket), "-P", str(self.pid_file)])
        return _pid_from(self.pid_file)

    def reconfigure(self, config: str) -> None:
        self.config.write_text(config)
        self.cli("configure")

    def cli(self, *command: str) -> str:
        result = subprocess.run(["birdc", "-s", str(self.socket), *command],
                                capture_output=True, text=True, check=False, timeout=30)
        return result.stdout


class Frr:
    """zebra + bgpd in a namespace, with their own path space (`-N name`)."""

    def __init__(self, netns: str, run_dir: Path, name: str) -> None:
        self.netns = netns
        self.dir = run_dir
        self.name = name
        self.config = run_dir / "frr.conf"
        self.log = run_dir / "frr.log"

    def start(self, config: str) -> list[int]:
        if not Path("/usr/lib/frr/bgpd").exists():
            raise PeerError("FRR is not installed (Debian package frr)")
        uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
        sockets = Path("/var/run/frr") / self.name
        for folder in (self.dir, sockets):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, uid, gid)
        self.config.write_text(config)
        self.log.touch()
        for path in (self.config, self.log):
            os.chown(path, uid, gid)
        pids = []
        for daemon in ("zebra", "bgpd"):
            pid_file = self.dir / f"{daemon}.pid"
            _run(["ip", "netns", "exec", self.netns, f"/usr/lib/frr/{daemon}", "-d",
                  "-N", self.name, "-f", str(self.config), "-i", str(pid_file)])
            pids.append(_pid_from(pid_file))
        return pids

    def vtysh(self, *commands: str) -> str:
        argv = ["ip", "netns", "exec", self.netns, "vtysh", "-N", self.name]
        for command in commands:
            argv += ["-c", command]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        return result.stdout

    def cleanup(self) -> None:
        shutil.rmtree(Path("/var/run/frr") / self.name, ignore_errors=True)
