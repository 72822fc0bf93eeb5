"""A CNI request, validated: environment variables and network configuration.

Pure: it takes the environment and stdin bytes and gives a `Request`, or raises
`CniError` with the spec's code and a message that names what was wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni.spec import DECODE_FAILURE, INVALID_CONFIG, INVALID_ENV, CniError, check_version

PLUGIN = "l3fabric"
IPAM_PLUGIN = "l3fabric-ipam"
DEFAULT_MTU = 1500
MTU_RANGE = (576, 65535)

_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s]")
_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_ARGS = ("K8S_POD_NAME", "NAME")


@dataclass(frozen=True)
class NetConf:
    version: str
    name: str
    type: str
    mtu: int = DEFAULT_MTU
    pools: tuple[str, ...] | None = None
    families: tuple[int, ...] = (4,)
    agent_socket: str | None = None
    dns: dict[str, Any] = field(default_factory=dict)
    prev_result: dict[str, Any] | None = None
    runtime_config: dict[str, Any] = field(default_factory=dict)
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    ipam_routes: tuple[tuple[str, str | None], ...] = ()  # (dst, gw) for IPAM-only use


@dataclass(frozen=True)
class Request:
    command: str
    plugin: str  # which executable was run: l3fabric or l3fabric-ipam
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    conf: NetConf
    # How the agent reaches the namespace: the descriptor the shim passed
    # (/proc/self/fd/N) when there is one, else the path the runtime gave.
    netns_access: str = ""

    @property
    def netns_path(self) -> str:
        return self.netns_access or self.netns

    @property
    def handle(self) -> str:
        return f"{self.container_id}.{self.ifname}"

    @property
    def workload_name(self) -> str | None:
        """The container's name when the runtime gave one, made DNS-safe."""
        raw = next((self.args[k] for k in NAME_ARGS if self.args.get(k)), None)
        raw = raw or self.conf.runtime_config.get("name")
        if not raw:
            return None
        name = str(raw).lower()
        return name if _DNS_NAME.match(name) else None


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K1=V1;K2=V2`."""
    args: dict[str, str] = {}
    for part in filter(None, text.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        args[key] = value
    return args


def parse_conf(raw: bytes, verb: str, plugin: str) -> NetConf:
    try:
        doc = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, f"network configuration is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CniError(DECODE_FAILURE, "network configuration must be a JSON object")
    version = doc.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(INVALID_CONFIG, "network configuration has no cniVersion")
    check_version(version, verb)
    name = doc.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise CniError(INVALID_CONFIG, f"network name {name!r} is missing or invalid")
    ipam = doc.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise CniError(INVALID_CONFIG, "ipam must be an object")
    if plugin == PLUGIN and ipam.get("type", IPAM_PLUGIN) != IPAM_PLUGIN:
        raise CniError(INVALID_CONFIG, f"ipam type {ipam.get('type')!r} is not supported by "
                                       f"{PLUGIN}; use {IPAM_PLUGIN} or leave ipam out")
    mtu = doc.get("mtu", DEFAULT_MTU)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or \
            not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
        raise CniError(INVALID_CONFIG, f"mtu {mtu!r} must be an integer from "
                                       f"{MTU_RANGE[0]} to {MTU_RANGE[1]}")
    pools = ipam.get("pools")
    if pools is not None and (not isinstance(pools, list) or
                              not all(isinstance(p, str) and p for p in pools)):
        raise CniError(INVALID_CONFIG, "ipam.pools must be a list of pool names")
    families = ipam.get("families", [4])
    if not isinstance(families, list) or not families or \
            not set(families) <= {4, 6} or len(set(families)) != len(families):
        raise CniError(INVALID_CONFIG, f"ipam.families {families!r} must be [4], [6] or [4, 6]")
    socket_path = doc.get("agent_socket")
    if socket_path is not None and (not isinstance(socket_path, str) or not socket_path):
        raise CniError(INVALID_CONFIG, "agent_socket must be a path or @abstract-name")
    dns = doc.get("dns") or {}
    prev = doc.get("prevResult")
    if not isinstance(dns, dict) or (prev is not None and not isinstance(prev, dict)):
        raise CniError(INVALID_CONFIG, "dns and prevResult must be objects")
    runtime = doc.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig must be an object")
    routes = ipam.get("routes") or []
    if not isinstance(routes, list) or not all(
            isinstance(r, dict) and isinstance(r.get("dst"), str) for r in routes):
        raise CniError(INVALID_CONFIG, "ipam.routes must be a list of {\"dst\": CIDR}")
    valid = None
    if verb == "GC":
        valid = _valid_attachments(doc.get("cni.dev/valid-attachments"))
    return NetConf(version, name, str(doc.get("type", plugin)), mtu,
                   tuple(pools) if pools is not None else None, tuple(families),
                   socket_path, dns, prev, runtime, valid,
                   tuple((r["dst"], r.get("gw")) for r in routes))


def _valid_attachments(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                or not isinstance(item.get("ifname"), str):
            raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments entries need "
                                           "containerID and ifname")
        out.append((item["containerID"], item["ifname"]))
    return tuple(out)


def parse_request(env: Mapping[str, str], stdin: bytes, plugin: str = PLUGIN) -> Request:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set")
    needs = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
             "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
             "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [var for var in needs if not env.get(var)]
    conf = parse_conf(stdin, command, plugin)
    if missing:
        raise CniError(INVALID_ENV, f"{command} needs {', '.join(missing)} set")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.match(container_id):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {container_id!r} has characters "
                                    "other than letters, digits, '_', '.', '-'")
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or _IFNAME_BAD.search(ifname) or ifname in (".", "..")):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENV, f"CNI_NETNS {netns!r} must be an absolute path")
    return Request(command, plugin, container_id, netns, ifname,
                   parse_args(env.get("CNI_ARGS", "")), conf)
