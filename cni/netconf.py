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
from fabric.model.handles import MAX_HANDLE, IpamError, check_handle
from fabric.model.policy import (
    DEFAULT_NAMESPACE,
    label_key_problem,
    label_value_problem,
    namespace_problem,
)

PLUGIN = "l3fabric"
IPAM_PLUGIN = "l3fabric-ipam"
DEFAULT_MTU = 1500
MTU_RANGE = (576, 65535)
IPV6_MIN_MTU = 1280  # RFC 8200: every IPv6 link carries 1280-byte packets
MAX_IFNAME = 15  # IFNAMSIZ - 1
# The IPAM handle is `<container id>.<ifname>` and becomes an etcd key segment of at
# most MAX_HANDLE characters, so the id may use what the longest ifname leaves.
MAX_CONTAINER_ID = MAX_HANDLE - 1 - MAX_IFNAME
# Real configurations nest a few levels (prevResult, runtimeConfig, args); the bound
# keeps every later walk over the document (copies, json.dumps of the result's dns)
# far from Python's recursion limit.
MAX_DEPTH = 64

_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s]")
_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_ARGS = ("K8S_POD_NAME", "NAME")
NAMESPACE_ARG = "K8S_POD_NAMESPACE"
POLICY_VERBS = ("ADD", "CHECK")  # the verbs that read a workload's namespace and labels


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
    labels: dict[str, str] = field(default_factory=dict)  # the workload's, for policy


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
        return name if _DNS_NAME.fullmatch(name) else None

    @property
    def pod_namespace(self) -> str:
        """The workload's namespace for network policy: K8S_POD_NAMESPACE as kubelet
        and containerd send it, else `default`."""
        return self.args.get(NAMESPACE_ARG) or DEFAULT_NAMESPACE


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K1=V1;K2=V2`."""
    args: dict[str, str] = {}
    for part in filter(None, text.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        args[key] = value
    return args


def network_name_problem(name: object) -> str | None:
    """Why `name` cannot name a CNI network, or None when it can.

    The one rule for both sides: the plugin refuses a configuration whose name breaks
    it, and `fabricctl cni install` refuses to write such a conflist (whose file name
    the network name also becomes, so '/' and newlines must never pass).
    """
    if not isinstance(name, str) or not name:
        return f"network name {name!r} is missing or not a string"
    if not _NETWORK_NAME.fullmatch(name):
        return (f"network name {name!r} is invalid: start with a letter or digit and use "
                "only letters, digits, '_', '.' and '-'")
    return None


def _kind(value: object) -> str:
    """The JSON type of a decoded value, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _object(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    """An optional object field: absent or null is empty, anything else but an object
    is refused. (`doc.get(key) or {}` let `"ipam": []` or `"dns": ""` pass unnoticed.)"""
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CniError(INVALID_CONFIG, f"{key} must be a JSON object, not {_kind(value)}")
    return value


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels; iterative, so it cannot recurse."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, f"network configuration is not JSON: {exc}") from exc
    except RecursionError as exc:  # the C decoder recurses once per nesting level
        raise CniError(DECODE_FAILURE, "network configuration nests too deeply to decode "
                                       f"(at most {MAX_DEPTH} levels)") from exc
    if not isinstance(doc, dict):
        raise CniError(DECODE_FAILURE, "network configuration must be a JSON object")
    if _too_deep(doc, MAX_DEPTH):
        raise CniError(DECODE_FAILURE, f"network configuration nests more than {MAX_DEPTH} "
                                       "levels deep")
    return doc


def parse_conf(raw: bytes, verb: str, plugin: str) -> NetConf:
    doc = _decode(raw)
    version = doc.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(INVALID_CONFIG, "network configuration has no cniVersion")
    check_version(version, verb)
    name = doc.get("name")
    problem = network_name_problem(name)
    if problem:
        raise CniError(INVALID_CONFIG, problem)
    ipam = _object(doc, "ipam")
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
    # type() rather than isinstance: true is an int to Python, and 4.0 == 4 in a set.
    if not isinstance(families, list) or not families or \
            any(type(f) is not int or f not in (4, 6) for f in families) or \
            len(set(families)) != len(families):
        raise CniError(INVALID_CONFIG, f"ipam.families {families!r} must be [4], [6] or [4, 6]")
    if 6 in families and mtu < IPV6_MIN_MTU:
        raise CniError(INVALID_CONFIG, f"mtu {mtu} is below IPv6's minimum of {IPV6_MIN_MTU} "
                                       "(ipam.families asks for IPv6)")
    socket_path = doc.get("agent_socket")
    if socket_path is not None and (not isinstance(socket_path, str) or not socket_path):
        raise CniError(INVALID_CONFIG, "agent_socket must be a path or @abstract-name")
    dns = _object(doc, "dns")
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, f"prevResult must be a JSON object, not {_kind(prev)}")
    runtime = _object(doc, "runtimeConfig")
    routes = ipam.get("routes")
    routes = [] if routes is None else routes
    if not isinstance(routes, list) or not all(
            isinstance(r, dict) and isinstance(r.get("dst"), str)
            and isinstance(r.get("gw"), str | None) for r in routes):
        raise CniError(INVALID_CONFIG, "ipam.routes must be a list of "
                                       "{\"dst\": CIDR, \"gw\": address (optional)}")
    # Labels are policy input for a new attachment: only ADD and CHECK read them. A DEL
    # (and GC) must not fail on them: runtimes send DEL with the same arguments after
    # a refused ADD, and it must succeed for the container to be cleaned up.
    labels = _labels(doc, runtime) if verb in POLICY_VERBS else {}
    valid = None
    if verb == "GC":
        valid = _valid_attachments(doc.get("cni.dev/valid-attachments"))
    return NetConf(version, name, str(doc.get("type", plugin)), mtu,
                   tuple(pools) if pools is not None else None, tuple(families),
                   socket_path, dns, prev, runtime, valid,
                   tuple((r["dst"], r.get("gw")) for r in routes), labels)


def _labels(doc: Mapping[str, Any], runtime: Mapping[str, Any]) -> dict[str, str]:
    """The workload's labels: `args.cni.labels` (the CNI conventions' list of
    {key, value}), then `runtimeConfig.labels` (a map; a runtime passes it per
    container through the `labels` capability), later ones winning."""
    labels: dict[str, str] = {}
    args = doc.get("args")
    cni_args = args.get("cni") if isinstance(args, dict) else None
    listed = cni_args.get("labels") if isinstance(cni_args, dict) else None
    if listed is not None:
        if not isinstance(listed, list) or not all(
                isinstance(i, dict) and "key" in i and "value" in i for i in listed):
            raise CniError(INVALID_CONFIG, "args.cni.labels must be a list of "
                                           "{\"key\": K, \"value\": V}")
        labels.update((i["key"], i["value"]) for i in listed)
    mapped = runtime.get("labels")
    if mapped is not None:
        if not isinstance(mapped, dict):
            raise CniError(INVALID_CONFIG, "runtimeConfig.labels must be a map of label "
                                           "keys to values")
        labels.update(mapped)
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise CniError(INVALID_CONFIG, f"workload labels: {problem}")
    return {str(k): str(v) for k, v in labels.items()}


def _valid_attachments(value: Any) -> tuple[tuple[str, str], ...]:
    """The spec requires the key for GC; without it every attachment of the network on
    this node would count as stale, so a GC that lacks it is refused, not obeyed."""
    if value is None:
        raise CniError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments (the "
                                       "attachments to keep; an empty list keeps none)")
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
    if len(container_id) > MAX_CONTAINER_ID:
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID is {len(container_id)} characters long; "
                                    f"at most {MAX_CONTAINER_ID} are allowed (the IPAM handle "
                                    "<CNI_CONTAINERID>.<CNI_IFNAME> is an etcd key segment of "
                                    f"at most {MAX_HANDLE} characters)")
    if container_id and not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {container_id!r} has characters "
                                    "other than letters, digits, '_', '.', '-'")
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > MAX_IFNAME or _IFNAME_BAD.search(ifname)
                   or ifname in (".", "..")):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name "
                                    f"(at most {MAX_IFNAME} characters, no '/', ':' or space)")
    if container_id and ifname:
        try:
            check_handle(f"{container_id}.{ifname}")
        except IpamError as exc:
            raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r}: l3fabric names the attachment "
                                        "<CNI_CONTAINERID>.<CNI_IFNAME>, which allows only "
                                        "letters, digits and _.:@-") from exc
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENV, f"CNI_NETNS {netns!r} must be an absolute path")
    args = parse_args(env.get("CNI_ARGS", ""))
    if command not in POLICY_VERBS:  # the namespace is policy input too (see parse_conf)
        args.pop(NAMESPACE_ARG, None)
    elif args.get(NAMESPACE_ARG) and namespace_problem(args[NAMESPACE_ARG]):
        raise CniError(INVALID_ENV, f"CNI_ARGS {NAMESPACE_ARG}: "
                                    f"{namespace_problem(args[NAMESPACE_ARG])}")
    return Request(command, plugin, container_id, netns, ifname, args, conf)
