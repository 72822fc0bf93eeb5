"""The CNI 1.1 contract, pure: versions, error codes, result documents.

Results are built once in the 1.x shape and converted to the version the runtime
asked for, so every verb speaks every supported version the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"

# Well-known error codes (SPEC.md, "Error").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_READY = 50
LIMITED_CONNECTIVITY = 51

# Verbs and the first version that has them.
VERBS = {"ADD": "0.1.0", "DEL": "0.1.0", "CHECK": "0.4.0", "VERSION": "0.1.0",
         "GC": "1.1.0", "STATUS": "1.1.0"}


class CniError(Exception):
    """A failure reported to the runtime as the spec's error document."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


def version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError as exc:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {text!r} is not a version") from exc


def check_version(version: str, verb: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION,
                       f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    first = VERBS.get(verb)
    if first is None:
        raise CniError(INVALID_ENV, f"CNI_COMMAND {verb!r} is not a CNI verb",
                       f"one of {', '.join(VERBS)}")
    if version_tuple(version) < version_tuple(first):
        raise CniError(INCOMPATIBLE_VERSION,
                       f"{verb} needs cniVersion {first} or later, the config says {version}")


def version_document() -> dict[str, Any]:
    return {"cniVersion": LATEST, "supportedVersions": list(SUPPORTED_VERSIONS)}


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path for container interfaces, empty on the host


@dataclass(frozen=True)
class IpConfig:
    address: str  # CIDR notation: 10.244.0.5/32
    gateway: str | None = None
    interface: int | None = None  # index into Result.interfaces

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4


@dataclass(frozen=True)
class RouteConfig:
    dst: str
    gw: str | None = None


@dataclass
class Result:
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IpConfig] = field(default_factory=list)
    routes: list[RouteConfig] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)

    def document(self, version: str) -> dict[str, Any]:
        """The result in the format of `version` (0.3.x and 0.4.0 carry ip versions)."""
        legacy = version_tuple(version) < (1, 0, 0)
        doc: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            doc["interfaces"] = [
                {k: v for k, v in (("name", i.name), ("mac", i.mac), ("sandbox", i.sandbox))
                 if v} for i in self.interfaces]
        ips = []
        for ip in self.ips:
            entry: dict[str, Any] = {"address": ip.address}
            if legacy:
                entry["version"] = str(ip.family)
            if ip.gateway:
                entry["gateway"] = ip.gateway
            if ip.interface is not None:
                entry["interface"] = ip.interface
            ips.append(entry)
        doc["ips"] = ips
        if self.routes:
            doc["routes"] = [{"dst": r.dst, **({"gw": r.gw} if r.gw else {})}
                             for r in self.routes]
        doc["dns"] = dict(self.dns)
        return doc

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Result:
        """A prevResult of any supported version (for CHECK, and for chained IPAM)."""
        try:
            interfaces = [Interface(str(i.get("name", "")), str(i.get("mac", "")),
                                    str(i.get("sandbox", ""))) for i in doc.get("interfaces") or []]
            ips = [IpConfig(str(i["address"]), i.get("gateway"), i.get("interface"))
                   for i in doc.get("ips") or []]
            routes = [RouteConfig(str(r["dst"]), r.get("gw")) for r in doc.get("routes") or []]
        except (KeyError, TypeError, AttributeError) as exc:
            raise CniError(DECODE_FAILURE, f"prevResult is not a CNI result: {exc}") from exc
        return cls(interfaces, ips, routes, dict(doc.get("dns") or {}))
