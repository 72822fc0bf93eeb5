"""The agent's settings: one table, read from flags, then env, then the config file.

Every setting has a TOML location (`[section] key`), an environment variable and a
flag, so a systemd unit, a Vagrant provisioner and a test can each use what suits
them. Validation happens once, at start, and an error names the setting the way the
user wrote it (`agent.toml [bgp] hold_time`, `FABRIC_HOLD_TIME` or `--hold-time`).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from fabric.kernel.routes import DEFAULT_PROTOCOL
from fabric.settings import EtcdSettings, SettingsError, add_etcd_arguments, etcd_settings
from fabric.sockets import CONTROL_SOCKET

DEFAULT_CONFIG = "/etc/l3fabric/agent.toml"
ENV_CONFIG = "FABRIC_CONFIG"
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ConfigError(SettingsError):
    """A setting we refuse; the message names it and says why."""


@dataclass(frozen=True)
class Setting:
    name: str  # the AgentConfig field
    section: str
    key: str
    parse: Callable[[Any], Any]
    help: str

    @property
    def env(self) -> str:
        return "FABRIC_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}")
        return number
    return parse


def _seconds(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _node_name(value: Any) -> str:
    name = str(value)
    if not _NODE_NAME.match(name):
        raise ValueError("use lower-case letters, digits, '-' and '.' (at most 63)")
    return name


def _ipv4(value: Any) -> str:
    address = ipaddress.ip_address(str(value))
    if address.version != 4:
        raise ValueError("must be an IPv4 address")
    return str(address)


def _ipv6(value: Any) -> str:
    address = ipaddress.ip_address(str(value))
    if address.version != 6 or address.is_link_local:
        raise ValueError("must be a global or unique-local IPv6 address (not link-local)")
    return str(address)


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    labels = {}
    for part in filter(None, str(value).split(",")):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not key=value")
        labels[key.strip()] = val.strip()
    return labels


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value in (None, "") else parse(value)


def _text(value: Any) -> str:
    return str(value)


def _socket_name(value: Any) -> str:
    text = str(value)
    if not text or not (text.startswith("@") or text.startswith("/")):
        raise ValueError("must be an absolute path or @abstract-name")
    return text


SETTINGS = (
    Setting("node_name", "node", "name", _node_name, "this node's name (default: hostname)"),
    Setting("node_address", "node", "address", _optional(_ipv4),
            "underlay IPv4 address: source and next hop of IPv4 sessions and routes"),
    Setting("node_address6", "node", "address6", _optional(_ipv6),
            "underlay IPv6 address: source and next hop of IPv6 sessions and routes"),
    Setting("router_id", "node", "router_id", _optional(_ipv4),
            "BGP identifier (default: the IPv4 address; on an IPv6-only node, the low 32 "
            "bits of its IPv6 address)"),
    Setting("asn", "node", "as", _optional(_int_in(1, 4294967295)),
            "this node's AS (default: the fabric's, `fabricctl bgp config`)"),
    Setting("labels", "node", "labels", _labels, "node labels, key=value,key=value"),
    Setting("rr_cluster_id", "node", "rr_cluster_id", _optional(_ipv4),
            "make this node a route reflector with this cluster id"),
    Setting("hold_time", "bgp", "hold_time", _int_in(3, 65535), "BGP hold time, seconds"),
    Setting("keepalive", "bgp", "keepalive", _optional(_int_in(1, 21845)),
            "BGP keepalive, seconds (ExaBGP uses hold_time / 3)"),
    Setting("graceful_restart", "bgp", "graceful_restart", _int_in(0, 4095),
            "graceful restart time advertised to peers, seconds (0: off)"),
    Setting("ecmp", "bgp", "ecmp", _bool, "install equal paths as ECMP routes"),
    Setting("max_prefixes", "bgp", "max_prefixes", _int_in(1, 10_000_000),
            "default per-peer limit of received prefixes"),
    Setting("exabgp", "bgp", "exabgp", _optional(_text), "path of the exabgp executable"),
    Setting("route_protocol", "kernel", "route_protocol", _int_in(5, 254),
            "route protocol number the agent owns"),
    Setting("resync_interval", "kernel", "resync_interval", _seconds,
            "seconds between full kernel re-reads"),
    Setting("host_check_interval", "kernel", "host_check_interval", _seconds,
            "seconds between checks that forwarding is on and the NAT rules are in place"),
    Setting("nat_outgoing", "kernel", "nat_outgoing", _bool,
            "masquerade traffic of nat-outgoing pools leaving the fabric"),
    Setting("lease_ttl", "etcd", "lease_ttl", _int_in(3, 3600),
            "seconds the node's liveness key outlives a dead agent"),
    Setting("gc_interval", "ipam", "gc_interval", _seconds, "seconds between IPAM GC rounds"),
    Setting("gc_grace", "ipam", "gc_grace", _seconds,
            "seconds a leak must be seen before GC frees it"),
    Setting("gone_grace", "ipam", "gone_grace", _seconds,
            "seconds a workload's host interface must be gone before its addresses are "
            "freed (its container is gone: a reboot, a runtime that never sent DEL)"),
    Setting("dns_domain", "dns", "domain", _text, "workloads resolve as NAME.<domain>"),
    Setting("dns_port", "dns", "port", _int_in(0, 65535), "DNS port (0: off)"),
    Setting("metrics_port", "metrics", "port", _int_in(0, 65535),
            "Prometheus /metrics port (0: off)"),
    Setting("run_dir", "paths", "run_dir", _text, "ExaBGP config, pid and log files"),
    Setting("cni_socket", "paths", "cni_socket", _socket_name, "socket the CNI plugin uses"),
    Setting("control_socket", "paths", "control_socket", _socket_name,
            "socket fabricctl uses"),
    Setting("log_level", "log", "level", _text, "debug, info, warning or error"),
)


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = field(default_factory=lambda: socket.gethostname().split(".")[0].lower())
    node_address: str = ""
    node_address6: str = ""
    router_id: str = ""
    asn: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None
    hold_time: int = 9
    keepalive: int | None = None
    graceful_restart: int = 120
    ecmp: bool = False
    max_prefixes: int = 100_000
    exabgp: str | None = None
    route_protocol: int = DEFAULT_PROTOCOL
    resync_interval: float = 10.0
    host_check_interval: float = 30.0
    nat_outgoing: bool = True
    lease_ttl: int = 20
    gc_interval: float = 60.0
    gc_grace: float = 600.0
    gone_grace: float = 60.0
    dns_domain: str = "fabric.internal"
    dns_port: int = 53
    metrics_port: int = 9473
    run_dir: str = "/run/l3fabric"
    cni_socket: str = "@l3fabric/cni"
    control_socket: str = CONTROL_SOCKET
    log_level: str = "info"
    etcd: EtcdSettings = field(default_factory=EtcdSettings)

    @property
    def address(self) -> str:
        """The node's identity in etcd: its IPv4 address, or its IPv6 one when it has
        no IPv4 (see fabric.model.nodes.Node)."""
        return self.node_address or self.node_address6 or ""

    def exabgp_command(self) -> list[str]:
        """How to run ExaBGP: the one installed with the agent, through `bgp.exabgp_run`
        (ExaBGP's own main with a reactor that rests when idle), unless `[bgp] exabgp`
        names another executable, which then runs as it is."""
        if self.exabgp:
            return [self.exabgp]
        import sys
        return [sys.executable, "-m", "bgp.exabgp_run"]

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML config file (env {ENV_CONFIG}, default {DEFAULT_CONFIG} "
                             "if it exists)")
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.name, metavar="VALUE",
                            help=f"{setting.help} (env {setting.env}, "
                                 f"[{setting.section}] {setting.key})")
    add_etcd_arguments(parser)


def load(args: argparse.Namespace | None = None,
         env: Mapping[str, str] | None = None) -> AgentConfig:
    """Flags win over the environment, which wins over the file, then defaults."""
    env = os.environ if env is None else env
    path = getattr(args, "config", None) or env.get(ENV_CONFIG)
    file_values = _read_file(path) if path else (
        _read_file(DEFAULT_CONFIG) if os.path.exists(DEFAULT_CONFIG) else {})
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flag = getattr(args, setting.name, None) if args is not None else None
        if flag is not None:
            raw, where = flag, setting.flag
        elif setting.env in env:
            raw, where = env[setting.env], setting.env
        elif setting.name in file_values:
            raw, where = file_values[setting.name], f"[{setting.section}] {setting.key}"
        else:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {raw!r}: {exc}") from exc
    etcd_file = file_values.get("_etcd", {})
    etcd_env = dict(env)
    for key, var in (("endpoints", "FABRIC_ETCD_ENDPOINTS"), ("ca", "FABRIC_ETCD_CA"),
                     ("cert", "FABRIC_ETCD_CERT"), ("key", "FABRIC_ETCD_KEY")):
        if key in etcd_file and var not in etcd_env:
            etcd_env[var] = str(etcd_file[key])
    values["etcd"] = etcd_settings(args, etcd_env)
    config = AgentConfig(**values)
    _validate(config)
    return config


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    known = {(s.section, s.key): s.name for s in SETTINGS}
    sections = {s.section for s in SETTINGS} | {"etcd"}
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in sections or not isinstance(table, dict):
            raise ConfigError(f"config file {path}: unknown section [{section}]")
        for key, value in table.items():
            if section == "etcd" and key in ("endpoints", "ca", "cert", "key"):
                values.setdefault("_etcd", {})[key] = value
                continue
            name = known.get((section, key))
            if name is None:
                raise ConfigError(f"config file {path}: unknown setting [{section}] {key}")
            values[name] = value
    return values


def _validate(config: AgentConfig) -> None:
    if not config.node_address and not config.node_address6:
        raise ConfigError("a node address is required: IPv4 (--node-address, "
                          "FABRIC_NODE_ADDRESS or [node] address), IPv6 (--node-address6, "
                          "FABRIC_NODE_ADDRESS6 or [node] address6), or both")
    if config.keepalive is not None and config.keepalive * 3 != config.hold_time:
        raise ConfigError(
            f"keepalive {config.keepalive}: ExaBGP sends keepalives every hold_time / 3 "
            f"({config.hold_time // 3} s for hold_time {config.hold_time}); set hold_time "
            f"to {config.keepalive * 3} for a {config.keepalive} s keepalive")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log level {config.log_level!r}: use debug, info, warning or error")


def describe() -> list[dict[str, str]]:
    """Every setting with its three names and default (for docs and `--help`)."""
    defaults: dict[str, str] = {}
    for f in fields(AgentConfig):
        if f.default is not MISSING:  # computed defaults (the hostname) are in the help
            defaults[f.name] = "" if f.default is None else str(f.default)
    return [{"setting": f"[{s.section}] {s.key}", "env": s.env, "flag": s.flag,
             "default": defaults.get(s.name, ""), "help": s.help} for s in SETTINGS]


def settings_table() -> str:
    """The settings as docs/operations.md shows them (a test keeps the page in step)."""
    rows = ["| file | environment | flag | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for item in describe():
        default = f"`{item['default']}`" if item["default"] else ""
        rows.append(f"| `{item['setting']}` | `{item['env']}` | `{item['flag']}` | {default} "
                    f"| {item['help']} |")
    return "\n".join(rows) + "\n"
