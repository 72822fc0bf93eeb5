"""ExaBGP's configuration and environment, rendered from the peer set. Pure.

What we announce lives in the configuration itself, as static routes in every
neighbor block, not only behind the API: ExaBGP keeps no RIB across a restart and
sends End-of-RIB right after a session comes up (Exa-Networks/exabgp#328), so routes
announced later through the API would be flushed by peers doing graceful restart.
Static routes are sent before End-of-RIB. A change is a new file plus SIGUSR1:
ExaBGP then announces what was added without touching sessions that did not change;
it does not withdraw what was removed, so the speaker withdraws that through the API.

A node that is a route reflector also lists, in each client's block, the routes it
reflects to that client, with ORIGINATOR_ID and CLUSTER_LIST (RFC 4456), for the
same reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bgp.peers import Peer

API_PROCESS = "fabric-agent"
_SAFE_PASSWORD = re.compile(r"^[!#-:<-z|~]{1,80}$")  # no space, quote, ';', '{', '}'


@dataclass(frozen=True)
class SpeakerSettings:
    router_id: str
    local_as: int
    hold_time: int = 9
    graceful_restart: int = 120
    relay_command: Sequence[str] = ()


@dataclass(frozen=True)
class Reflected:
    """A route reflected to clients: the original next hop and path, plus RR marks."""

    prefix: str
    next_hop: str
    as_path: tuple[int, ...]
    originator_id: str
    cluster_id: str


def password_ok(password: str) -> bool:
    return bool(_SAFE_PASSWORD.match(password))


def _route(prefix: str) -> str:
    return f"route {prefix} next-hop self;"


def _reflected(route: Reflected) -> str:
    path = f" as-path [ {' '.join(map(str, route.as_path))} ]" if route.as_path else ""
    return (f"route {route.prefix} next-hop {route.next_hop}{path} "
            f"originator-id {route.originator_id} cluster-list [ {route.cluster_id} ];")


def render(settings: SpeakerSettings, peers: Mapping[str, Peer], exports: Iterable[str],
           reflected: Mapping[str, Sequence[Reflected]] | None = None) -> str:
    """The whole configuration file, deterministic for the same inputs."""
    exports = sorted(exports)
    reflected = reflected or {}
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
            f"    description \"{peer.kind} {peer.name}\";",
            f"    router-id {settings.router_id};",
            f"    local-address {settings.router_id};",
            f"    local-as {settings.local_as};",
            f"    peer-as {peer.asn};",
            f"    hold-time {settings.hold_time};",
            "    passive false;",
        ]
        if peer.password:
            if not password_ok(peer.password):
                raise ValueError(f"peer {peer.name}: password has characters ExaBGP's "
                                 "configuration cannot carry (space, quote, ';', braces)")
            lines.append(f"    md5-password \"{peer.password}\";")
        lines.append("    capability {")
        if settings.graceful_restart:
            lines.append(f"        graceful-restart {settings.graceful_restart};")
        lines += [
            "        route-refresh;",
            "    }",
            "    family { ipv4 unicast; }",
            f"    api {{ processes [ {API_PROCESS} ]; neighbor-changes; "
            "receive { parsed; update; open; notification; } }",
        ]
        routes = [_route(p) for p in exports if ":" not in p]
        routes += [_reflected(r) for r in sorted(reflected.get(address, ()),
                                                  key=lambda r: r.prefix)]
        if routes:
            lines.append("    static {")
            lines += [f"        {r}" for r in routes]
            lines.append("    }")
        lines += ["}", ""]
    return "\n".join(lines)


def environment(router_id: str, pid_file: str) -> dict[str, str]:
    """ExaBGP's settings, passed as environment variables."""
    return {
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": pid_file,
        "exabgp.api.cli": "false",  # no FIFOs in /run: the agent is the only API user
        "exabgp.api.ack": "true",
        # When the API process dies the agent is gone or restarting: ExaBGP must not
        # carry on alone, and the agent's supervisor restarts it.
        "exabgp.api.respawn": "false",
        "exabgp.api.terminate": "true",
        "exabgp.api.encoder": "json",
        "exabgp.tcp.bind": router_id,  # also accept sessions the peers open
        "exabgp.tcp.port": "179",
        "exabgp.bgp.passive": "false",
        "exabgp.log.destination": "stdout",
        "exabgp.log.level": "INFO",
        "exabgp.log.short": "true",
        "exabgp.log.packets": "false",
        "exabgp.log.routes": "false",
        "exabgp.log.rib": "false",
        "exabgp.log.parser": "false",
    }
