"""ExaBGP's configuration and environment, rendered from the peer set. Pure.

Our own routes (blocks, borrowed addresses) live in the configuration itself, as
static routes in every neighbor block, not only behind the API: ExaBGP keeps no RIB
across a restart and sends End-of-RIB right after a session comes up
(Exa-Networks/exabgp#328), so routes announced later through the API would be flushed
by peers doing graceful restart. Static routes are sent before End-of-RIB.

The file is rewritten whenever the neighbors or our routes change, but ExaBGP is told
to reload it only when the neighbors change: a change of our routes is announced or
withdrawn through the API at once (`bgp.api` commands), and the file is what the next
start, or the next reload, reads. A reload diffs the file against the one it last
loaded, so routes already announced through the API are not sent twice.

Routes a route reflector passes on are API announcements only (they change with every
client's routes; re-rendering the file for each would not scale).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bgp.peers import Peer
from fabric.model.peers import check_password

API_PROCESS = "fabric-agent"
_UNSAFE_TEXT = re.compile(r"[^A-Za-z0-9 ._:@/+-]")


@dataclass(frozen=True)
class SpeakerSettings:
    router_id: str
    local_as: int
    hold_time: int = 9
    graceful_restart: int = 120
    relay_command: Sequence[str] = ()
    local4: str = ""  # our underlay addresses: the source of the sessions of each family
    local6: str = ""

    def local(self, family: int) -> str:
        return (self.local6 if family == 6 else self.local4) or self.router_id


def _description(peer: Peer) -> str:
    """Names come from etcd records: whatever is not plain text is left out, so no
    record can break the file (a quote in a name once did, on every node)."""
    return _UNSAFE_TEXT.sub("_", f"{peer.kind} {peer.name}")


def _route(prefix: str) -> str:
    return f"route {prefix} next-hop self;"


def render(settings: SpeakerSettings, peers: Mapping[str, Peer], exports: Iterable[str]) -> str:
    """The whole configuration file, deterministic for the same inputs."""
    exports = sorted(exports)
    command = " ".join(settings.relay_command)
    lines = [
        "# Written by fabric-agent; changes are overwritten.",
        f"process {API_PROCESS} {{",
        f"    run {command};",
        "    encoder json;",
        "}",
        "",
    ]
    for address in sorted(peers):
        peer = peers[address]
        lines += [
            f"neighbor {address} {{",
            f"    description \"{_description(peer)}\";",
            f"    router-id {settings.router_id};",
            f"    local-address {settings.local(peer.family)};",
            f"    local-as {settings.local_as};",
            f"    peer-as {peer.asn};",
            f"    hold-time {settings.hold_time};",
            "    passive false;",
            # The agent keeps every received route itself; ExaBGP's own copy of them
            # cost it 28% of its CPU and most of its memory at 100,000 routes.
            "    adj-rib-in false;",
        ]
        if peer.password:
            check_password(peer.password)  # records were checked; a Peer built in code too
            lines.append(f"    md5-password \"{peer.password}\";")
        lines.append("    capability {")
        if settings.graceful_restart:
            lines.append(f"        graceful-restart {settings.graceful_restart};")
        lines += [
            "        route-refresh;",
            "    }",
            f"    family {{ ipv{peer.family} unicast; }}",
            f"    api {{ processes [ {API_PROCESS} ]; neighbor-changes; "
            "receive { parsed; update; open; notification; } }",
        ]
        routes = [_route(p) for p in exports if (":" in p) == (peer.family == 6)]
        if routes:
            lines.append("    static {")
            lines += [f"        {r}" for r in routes]
            lines.append("    }")
        lines += ["}", ""]
    return "\n".join(lines)


def environment(*addresses: str) -> dict[str, str]:
    """ExaBGP's settings, passed as environment variables."""
    return {
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        # No pid file: the agent holds ExaBGP's pid itself, and a file naming a dead
        # (unreaped) ExaBGP made the next start refuse to run.
        "exabgp.daemon.pid": "",
        "exabgp.api.cli": "false",  # no FIFOs in /run: the agent is the only API user
        "exabgp.api.ack": "true",
        # When the API process dies the agent is gone or restarting: ExaBGP must not
        # carry on alone, and the agent's supervisor restarts it.
        "exabgp.api.respawn": "false",
        "exabgp.api.terminate": "true",
        "exabgp.api.encoder": "json",
        # Prefixes as plain strings, not {"nlri": ...} objects: less for ExaBGP to
        # write and for the agent to read (bgp.api reads either).
        "exabgp.api.compact": "true",
        "exabgp.tcp.bind": " ".join(a for a in addresses if a),  # accept peers' sessions
        "exabgp.tcp.port": "179",
        "exabgp.bgp.passive": "false",
        "exabgp.log.destination": "stdout",
        "exabgp.log.level": "INFO",
        "exabgp.log.short": "true",
        "exabgp.log.packets": "false",
        "exabgp.log.routes": "false",
        "exabgp.log.rib": "false",
        "exabgp.log.parser": "false",
        # A line per UPDATE counted and per API command handled costs ExaBGP CPU at
        # 100,000 routes and tells nobody anything. Kept: reactor and configuration
        # (the agent confirms reloads from them), network (sessions).
        "exabgp.log.statistics": "false",
        "exabgp.log.processes": "false",
    }
