"""etcd connection settings, read the same way by every command.

Every l3fabric process (agent, CLI, CNI handler) talks to the same etcd, so the
settings come from one place: flags first, then the `FABRIC_ETCD_*` environment, then
the default of a local etcd on 127.0.0.1:2379.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"

ENV_ENDPOINTS = "FABRIC_ETCD_ENDPOINTS"
ENV_CA = "FABRIC_ETCD_CA"
ENV_CERT = "FABRIC_ETCD_CERT"
ENV_KEY = "FABRIC_ETCD_KEY"
ENV_TIMEOUT = "FABRIC_ETCD_TIMEOUT"


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    @property
    def target(self) -> str:
        """The gRPC target's host part: a unix socket path is `unix://PATH`, an IPv6
        address is bracketed (gRPC reads `fd99::fe:2379` as a host named `fd99::fe:2379`)."""
        if self.scheme == "unix":
            return f"unix://{self.host}"
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.host}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[Endpoint, ...] = field(
        default_factory=lambda: parse_endpoints(DEFAULT_ENDPOINTS)
    )
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise SettingsError("etcd endpoints: at least one endpoint is needed")
        if bool(self.cert) != bool(self.key):
            raise SettingsError("etcd TLS: --etcd-cert and --etcd-key must be given together")
        secure = {e.secure for e in self.endpoints if e.scheme != "unix"}
        if len(secure) > 1:
            raise SettingsError("etcd endpoints: mixing http:// and https:// is not supported")
        if True in secure and not self.ca_cert:
            raise SettingsError("etcd endpoints use https:// but no CA was given (--etcd-ca)")
        for path_name, path in (("--etcd-ca", self.ca_cert), ("--etcd-cert", self.cert),
                                ("--etcd-key", self.key)):
            if path and not os.path.isfile(path):
                raise SettingsError(f"{path_name}: no such file: {path}")
        if self.timeout <= 0:
            raise SettingsError(f"etcd timeout must be positive, got {self.timeout}")

    def describe(self) -> str:
        return ",".join(str(e) for e in self.endpoints)


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """Parse a comma-separated list like `http://10.0.0.1:2379,http://10.0.0.2:2379`."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "://" not in item:
            item = f"http://{item}"
        if item.startswith("unix://"):
            # etcd names its unix socket "<name>:<port>" (in its working directory).
            path, _, port_text = item[len("unix://"):].rpartition(":")
            if not path.startswith("/") or not port_text.isdigit():
                raise SettingsError(f"etcd endpoint {item!r}: use unix:///PATH:PORT")
            endpoints.append(Endpoint("unix", path, int(port_text)))
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https"):
            raise SettingsError(f"etcd endpoint {item!r}: scheme must be http, https or unix")
        try:
            port = parts.port or 2379
        except ValueError as exc:
            raise SettingsError(f"etcd endpoint {item!r}: bad port") from exc
        if not parts.hostname:
            raise SettingsError(f"etcd endpoint {item!r}: no host")
        endpoints.append(Endpoint(parts.scheme, parts.hostname, port))
    if not endpoints:
        raise SettingsError(f"etcd endpoints: nothing usable in {text!r}")
    return tuple(endpoints)


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """The etcd flags, identical on every command."""
    group = parser.add_argument_group("etcd")
    group.add_argument("--etcd-endpoints", metavar="URLS",
                       help=f"comma-separated etcd URLs (env {ENV_ENDPOINTS}, "
                            f"default {DEFAULT_ENDPOINTS})")
    group.add_argument("--etcd-ca", metavar="FILE", help=f"CA bundle for TLS (env {ENV_CA})")
    group.add_argument("--etcd-cert", metavar="FILE",
                       help=f"client certificate for TLS (env {ENV_CERT})")
    group.add_argument("--etcd-key", metavar="FILE", help=f"client key for TLS (env {ENV_KEY})")


def etcd_settings(args: argparse.Namespace | None = None,
                  env: Mapping[str, str] | None = None) -> EtcdSettings:
    """Flags win over the environment, which wins over the default."""
    env = os.environ if env is None else env

    def pick(flag: str, var: str) -> str | None:
        value = getattr(args, flag, None) if args is not None else None
        return value if value else (env.get(var) or None)

    timeout_text = env.get(ENV_TIMEOUT)
    try:
        timeout = float(timeout_text) if timeout_text else 5.0
    except ValueError as exc:
        raise SettingsError(f"{ENV_TIMEOUT}: not a number: {timeout_text!r}") from exc
    return EtcdSettings(
        endpoints=parse_endpoints(pick("etcd_endpoints", ENV_ENDPOINTS) or DEFAULT_ENDPOINTS),
        ca_cert=pick("etcd_ca", ENV_CA),
        cert=pick("etcd_cert", ENV_CERT),
        key=pick("etcd_key", ENV_KEY),
        timeout=timeout,
    )
