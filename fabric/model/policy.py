"""Kubernetes `networking.k8s.io/v1` NetworkPolicy: the records, their validation, and
what they mean. Pure.

`parse_policy(manifest)` takes one decoded manifest (YAML or JSON) and gives a
`NetworkPolicy`, or raises `PolicyError` naming the field path and the reason, as the
Kubernetes API server would (`spec.ingress[0].from[1].ipBlock.except[0]: ...`). The
schema is Kubernetes' own, field for field, so existing YAML works unchanged; unknown
fields in `spec` are refused rather than ignored, because a misspelt `podSelecter`
silently selecting nothing would be a hole.

`decide()` is the reference semantics, written straight from the Kubernetes
documentation and independent of how a host enforces it (`fabric.policy.compiler`):

* a workload is isolated for ingress (egress) when at least one policy of its own
  namespace selects it and lists Ingress (Egress) in its policy types;
* an isolated workload admits a connection when any rule of any policy selecting it
  allows it (allows are a union, there is no deny);
* a connection needs both: egress allowed at the source, ingress at the destination;
* peers: `podSelector` alone means pods of the policy's namespace; `namespaceSelector`
  alone means every pod of the matching namespaces; both together mean matching pods
  in matching namespaces; `ipBlock` means addresses (workload or not) inside `cidr` and
  outside every `except`; an empty or missing `from`/`to` means everyone;
* ports: none listed means every port and protocol; `port` alone one port, with
  `endPort` a range; a named port matches nothing here (workloads declare no named
  container ports); `protocol` defaults to TCP.

Replies of allowed connections, and traffic between a workload and its own host, are
the enforcer's business (conntrack, hooks), not the model's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.model.nodes import Workload

API_VERSION = "networking.k8s.io/v1"
KIND = "NetworkPolicy"
METADATA_NAME_LABEL = "kubernetes.io/metadata.name"
DEFAULT_NAMESPACE = "default"
PROTOCOLS = ("TCP", "UDP", "SCTP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
TYPES = ("Ingress", "Egress")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Fields of ObjectMeta a manifest may carry (kubectl get -o yaml writes most of them):
# accepted and dropped, apart from name, namespace, labels and annotations.
_METADATA = {"name", "namespace", "labels", "annotations", "uid", "resourceVersion",
             "generation", "creationTimestamp", "managedFields", "selfLink",
             "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers",
             "ownerReferences", "generateName"}


class PolicyError(ValueError):
    """A manifest the API server would refuse: `path: reason`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


# -- labels and selectors ------------------------------------------------------------------
def label_key_problem(key: object) -> str | None:
    """Why `key` is not a Kubernetes label key (`[prefix/]name`), or None."""
    if not isinstance(key, str) or not key:
        return "a label key must be a non-empty string"
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: the prefix must be a DNS subdomain"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return (f"label key {key!r}: the name must be 63 characters or less, start and end "
                "with a letter or digit, with '-', '_', '.' between")
    return None


def label_value_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"label value {value!r} must be a string"
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (f"label value {value!r} must be 63 characters or less, start and end with a "
                "letter or digit, with '-', '_', '.' between")
    return None


def check_labels(labels: object, path: str) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise PolicyError(path, "must be a map of label keys to values")
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise PolicyError(f"{path}.{key}" if isinstance(key, str) else path, problem)
    return {str(k): str(v) for k, v in labels.items()}


def parse_label_assignments(words: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """`k=v` sets, `k-` removes (as `kubectl label`): ({key: value}, [keys to remove])."""
    set_: dict[str, str] = {}
    remove: list[str] = []
    for word in words:
        if word.endswith("-") and "=" not in word:
            key = word[:-1]
            problem = label_key_problem(key)
            if problem:
                raise PolicyError("", problem)
            remove.append(key)
            continue
        key, sep, value = word.partition("=")
        if not sep:
            raise PolicyError("", f"{word!r}: use KEY=VALUE to set a label, KEY- to remove it")
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise PolicyError("", problem)
        set_[key] = value
    return set_, remove


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist

    def describe(self) -> str:
        if self.operator in ("In", "NotIn"):
            return f"{self.key} {self.operator.lower()} ({','.join(self.values)})"
        return self.key if self.operator == "Exists" else f"!{self.key}"


@dataclass(frozen=True)
class Selector:
    """A LabelSelector: every matchLabels pair and every expression must hold.
    The empty selector matches everything."""

    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels) and \
            all(r.matches(labels) for r in self.expressions)

    @property
    def empty(self) -> bool:
        return not self.labels and not self.expressions

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.labels] + [r.describe() for r in self.expressions]
        return ",".join(parts) if parts else "(all)"


def parse_selector(doc: object, path: str) -> Selector:
    if doc is None:
        return Selector()
    if not isinstance(doc, dict):
        raise PolicyError(path, "must be a label selector (matchLabels, matchExpressions)")
    _known(doc, path, {"matchLabels", "matchExpressions"})
    labels = check_labels(doc.get("matchLabels"), f"{path}.matchLabels")
    expressions = []
    raw = doc.get("matchExpressions") or []
    if not isinstance(raw, list):
        raise PolicyError(f"{path}.matchExpressions", "must be a list")
    for index, item in enumerate(raw):
        where = f"{path}.matchExpressions[{index}]"
        if not isinstance(item, dict):
            raise PolicyError(where, "must be {key, operator, values}")
        _known(item, where, {"key", "operator", "values"})
        problem = label_key_problem(item.get("key"))
        if problem:
            raise PolicyError(f"{where}.key", problem)
        operator = item.get("operator")
        if operator not in OPERATORS:
            raise PolicyError(f"{where}.operator", f"{operator!r} is not one of "
                                                   f"{', '.join(OPERATORS)}")
        values = item.get("values") or []
        if not isinstance(values, list):
            raise PolicyError(f"{where}.values", "must be a list of strings")
        for vindex, value in enumerate(values):
            problem = label_value_problem(value)
            if problem:
                raise PolicyError(f"{where}.values[{vindex}]", problem)
        if operator in ("In", "NotIn") and not values:
            raise PolicyError(f"{where}.values", f"must be non-empty when `operator` is "
                                                 f"{operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{where}.values", f"may not be specified when `operator` is "
                                                 f"{operator}")
        expressions.append(Requirement(item["key"], operator, tuple(values)))
    return Selector(tuple(sorted(labels.items())), tuple(expressions))


# -- peers, ports, rules -----------------------------------------------------------------
@dataclass(frozen=True)
class IpBlock:
    cidr: str
    excepts: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return 6 if ":" in self.cidr else 4

    def ranges(self) -> list[tuple[int, int]]:
        """`cidr` less every `except`, as disjoint (first, last) address integers."""
        network = ipaddress.ip_network(self.cidr)
        remaining = [(int(network.network_address), int(network.broadcast_address))]
        for text in self.excepts:
            cut = ipaddress.ip_network(text)
            low, high = int(cut.network_address), int(cut.broadcast_address)
            nxt = []
            for first, last in remaining:
                if high < first or low > last:
                    nxt.append((first, last))
                    continue
                if first < low:
                    nxt.append((first, low - 1))
                if high < last:
                    nxt.append((high + 1, last))
            remaining = nxt
        return sorted(remaining)

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if ip.version != self.family or ip not in ipaddress.ip_network(self.cidr):
            return False
        return not any(ip in ipaddress.ip_network(e) for e in self.excepts)

    def describe(self) -> str:
        return self.cidr + "".join(f" except {e}" for e in self.excepts)


@dataclass(frozen=True)
class Peer:
    """One entry of `from` / `to`: selectors (pods, namespaces, or both) or an ipBlock."""

    pods: Selector | None = None
    namespaces: Selector | None = None
    block: IpBlock | None = None

    def describe(self) -> str:
        if self.block is not None:
            return f"ipBlock {self.block.describe()}"
        parts = []
        if self.namespaces is not None:
            parts.append(f"namespaces {self.namespaces.describe()}")
        if self.pods is not None:
            parts.append(f"pods {self.pods.describe()}")
        return " and ".join(parts)


@dataclass(frozen=True)
class PortRange:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named port
    end: int | None = None

    def matches(self, protocol: str, port: int) -> bool:
        if protocol != self.protocol:
            return False
        if self.port is None:
            return True
        if isinstance(self.port, str):
            return False  # named ports: no workload here declares one
        return self.port <= port <= (self.end or self.port)

    def describe(self) -> str:
        if self.port is None:
            return f"any/{self.protocol.lower()}"
        if self.end:
            return f"{self.port}-{self.end}/{self.protocol.lower()}"
        return f"{self.port}/{self.protocol.lower()}"


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...] = ()  # empty: everyone
    ports: tuple[PortRange, ...] = ()  # empty: every port and protocol

    def port_matches(self, protocol: str, port: int) -> bool:
        return not self.ports or any(p.matches(protocol, port) for p in self.ports)


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    selector: Selector
    types: tuple[str, ...]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    manifest: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == "ingress" else self.egress

    def applies(self, direction: str) -> bool:
        return ("Ingress" if direction == "ingress" else "Egress") in self.types

    def to_record(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "manifest": dict(self.manifest)}

    @classmethod
    def from_record(cls, value: Mapping[str, Any]) -> NetworkPolicy:
        return parse_policy(value["manifest"])

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()


def _known(doc: Mapping[str, Any], path: str, allowed: set[str]) -> None:
    for key in doc:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise PolicyError(where, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _list(doc: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{path}.{key}", "must be a list")
    return value


def _ip_block(doc: object, path: str) -> IpBlock:
    if not isinstance(doc, dict):
        raise PolicyError(path, "must be {cidr, except}")
    _known(doc, path, {"cidr", "except"})
    cidr = doc.get("cidr")
    if not isinstance(cidr, str) or not cidr:
        raise PolicyError(f"{path}.cidr", "Required value")
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise PolicyError(f"{path}.cidr", f"{cidr!r} is not a valid CIDR") from exc
    excepts = []
    for index, text in enumerate(_list(doc, "except", path)):
        where = f"{path}.except[{index}]"
        try:
            cut = ipaddress.ip_network(text, strict=False) if isinstance(text, str) else None
        except ValueError:
            cut = None
        if cut is None:
            raise PolicyError(where, f"{text!r} is not a valid CIDR")
        if cut.version != network.version or cut == network \
                or not cut.subnet_of(network):  # type: ignore[arg-type]
            raise PolicyError(where, f"must be a strict subset of `cidr` {network}")
        excepts.append(str(cut))
    return IpBlock(str(network), tuple(excepts))


def _peer(doc: object, path: str) -> Peer:
    if not isinstance(doc, dict):
        raise PolicyError(path, "must be a peer (podSelector, namespaceSelector, ipBlock)")
    _known(doc, path, {"podSelector", "namespaceSelector", "ipBlock"})
    present = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if
               doc.get(k) is not None]
    if not present:
        raise PolicyError(path, "must specify a peer: podSelector, namespaceSelector or "
                                "ipBlock")
    if "ipBlock" in present and len(present) > 1:
        raise PolicyError(path, "may not specify more than 1 peer type when ipBlock is given")
    if "ipBlock" in present:
        return Peer(block=_ip_block(doc["ipBlock"], f"{path}.ipBlock"))
    pods = parse_selector(doc["podSelector"], f"{path}.podSelector") \
        if "podSelector" in present else None
    namespaces = parse_selector(doc["namespaceSelector"], f"{path}.namespaceSelector") \
        if "namespaceSelector" in present else None
    return Peer(pods, namespaces)


def _port(doc: object, path: str) -> PortRange:
    if not isinstance(doc, dict):
        raise PolicyError(path, "must be {protocol, port, endPort}")
    _known(doc, path, {"protocol", "port", "endPort"})
    protocol = doc.get("protocol", "TCP")
    if protocol not in PROTOCOLS:
        raise PolicyError(f"{path}.protocol", f"Unsupported value: {protocol!r}: supported "
                                              f"values: {', '.join(PROTOCOLS)}")
    port = doc.get("port")
    end = doc.get("endPort")
    if isinstance(port, bool) or (port is not None and not isinstance(port, int | str)):
        raise PolicyError(f"{path}.port", "must be a port number or a port name")
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise PolicyError(f"{path}.port", f"{port} must be between 1 and 65535, inclusive")
    if isinstance(port, str):
        if port.isdigit():  # "80" in YAML quotes: an IntOrString holding a string
            raise PolicyError(f"{path}.port", f"{port!r} must be a number, not a quoted "
                                              "string, or a port name")
        if len(port) > 15 or not _PORT_NAME.match(port) or not re.search("[a-z]", port):
            raise PolicyError(f"{path}.port", f"{port!r} is not a valid port name")
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int):
            raise PolicyError(f"{path}.endPort", "must be an integer")
        if not isinstance(port, int):
            raise PolicyError(f"{path}.endPort", "may not be specified when `port` is "
                                                 "non-numeric" if port is not None else
                              "may not be specified without a numeric `port`")
        if not port <= end <= 65535:
            raise PolicyError(f"{path}.endPort", f"{end} must be greater than or equal to "
                                                 f"`port` {port} and at most 65535")
    return PortRange(protocol, port, end)


def _rule(doc: object, path: str, peers_key: str) -> Rule:
    if not isinstance(doc, dict):
        raise PolicyError(path, f"must be a rule ({peers_key}, ports)")
    _known(doc, path, {peers_key, "ports"})
    peers = tuple(_peer(p, f"{path}.{peers_key}[{i}]")
                  for i, p in enumerate(_list(doc, peers_key, path)))
    ports = tuple(_port(p, f"{path}.ports[{i}]") for i, p in enumerate(_list(doc, "ports", path)))
    return Rule(peers, ports)


def parse_policy(doc: object, default_namespace: str = DEFAULT_NAMESPACE) -> NetworkPolicy:
    """One manifest, validated whole; the manifest is kept normalized (namespace set,
    status and server-side metadata dropped) as the record to store."""
    if not isinstance(doc, dict):
        raise PolicyError("", "a manifest must be a mapping (apiVersion, kind, metadata, spec)")
    _known(doc, "", {"apiVersion", "kind", "metadata", "spec", "status"})
    if doc.get("apiVersion") != API_VERSION:
        raise PolicyError("apiVersion", f"{doc.get('apiVersion')!r}: only {API_VERSION} is "
                                        "supported")
    if doc.get("kind") != KIND:
        raise PolicyError("kind", f"{doc.get('kind')!r}: only {KIND} is supported")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise PolicyError("metadata", "Required value")
    _known(meta, "metadata", _METADATA)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("metadata.name", "Required value")
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise PolicyError("metadata.name", f"{name!r}: a lowercase RFC 1123 subdomain must "
                                           "consist of lower case alphanumeric characters, "
                                           "'-' or '.'")
    namespace = meta.get("namespace") or default_namespace
    problem = namespace_problem(namespace)
    if problem:
        raise PolicyError("metadata.namespace", problem)
    labels = check_labels(meta.get("labels"), "metadata.labels")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise PolicyError("metadata.annotations", "must be a map of strings")
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise PolicyError("spec", "must be a mapping")
    _known(spec, "spec", {"podSelector", "policyTypes", "ingress", "egress"})
    selector = parse_selector(spec.get("podSelector"), "spec.podSelector")
    ingress = tuple(_rule(r, f"spec.ingress[{i}]", "from")
                    for i, r in enumerate(_list(spec, "ingress", "spec")))
    egress = tuple(_rule(r, f"spec.egress[{i}]", "to")
                   for i, r in enumerate(_list(spec, "egress", "spec")))
    raw_types = spec.get("policyTypes")
    types: tuple[str, ...]
    # Kubernetes defaults the types when the list is empty, not only when it is absent
    # (SetDefaults_NetworkPolicy: `len(PolicyTypes) == 0`): `policyTypes: []` taken
    # literally would isolate nothing, a policy failing open.
    if raw_types is None or raw_types == []:
        types = ("Ingress", "Egress") if egress else ("Ingress",)
    else:
        if not isinstance(raw_types, list):
            raise PolicyError("spec.policyTypes", "must be a list")
        if len(raw_types) > 2:
            raise PolicyError("spec.policyTypes", "may not have more than 2 entries")
        for index, value in enumerate(raw_types):
            if value not in TYPES:
                raise PolicyError(f"spec.policyTypes[{index}]",
                                  f"Unsupported value: {value!r}: supported values: "
                                  "\"Ingress\", \"Egress\"")
        types = tuple(t for t in TYPES if t in raw_types)
    kept_meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        kept_meta["labels"] = labels
    if annotations:
        kept_meta["annotations"] = dict(annotations)
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": kept_meta,
                "spec": spec}
    return NetworkPolicy(namespace, name, selector, types, ingress, egress,
                         json.loads(json.dumps(manifest)))


def namespace_problem(namespace: object) -> str | None:
    if not isinstance(namespace, str) or not namespace or len(namespace) > 63 \
            or not _DNS_LABEL.match(namespace):
        return (f"{namespace!r}: a namespace is a lowercase RFC 1123 label (letters, digits, "
                "'-', at most 63 characters)")
    return None


def parse_reference(text: str) -> tuple[str, str]:
    """`NS/NAME` (or `NAME` in the default namespace)."""
    namespace, slash, name = text.rpartition("/")
    if not slash:
        namespace = DEFAULT_NAMESPACE
    if not name:
        raise PolicyError("", f"{text!r}: use NAMESPACE/NAME")
    problem = namespace_problem(namespace)
    if problem:
        raise PolicyError("", problem)
    return namespace, name


# -- endpoints and the reference decision --------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """A workload as policy sees it: its namespace, labels, addresses and host."""

    handle: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    ips: tuple[str, ...]
    node: str = ""
    host_ifname: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name or self.handle}"

    @classmethod
    def of(cls, record: Workload) -> Endpoint:
        """A registered workload (its record in etcd) as policy sees it."""
        return cls(record.handle, record.namespace or DEFAULT_NAMESPACE, record.name or "",
                   dict(record.labels), tuple(record.ips), record.node, record.host_ifname)


def namespace_labels(namespace: str, stored: Mapping[str, Mapping[str, str]]
                     ) -> dict[str, str]:
    """A namespace's labels: what was set, plus the automatic metadata.name label."""
    return {**stored.get(namespace, {}), METADATA_NAME_LABEL: namespace}


def selects(policy: NetworkPolicy, endpoint: Endpoint) -> bool:
    return policy.namespace == endpoint.namespace and policy.selector.matches(endpoint.labels)


def peer_matches(peer: Peer, policy_namespace: str, address: str, endpoint: Endpoint | None,
                 namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    if peer.block is not None:
        return peer.block.contains(address)
    if endpoint is None:
        return False
    if peer.namespaces is None:
        in_namespace = endpoint.namespace == policy_namespace
    else:
        in_namespace = peer.namespaces.matches(namespace_labels(endpoint.namespace, namespaces))
    return in_namespace and (peer.pods is None or peer.pods.matches(endpoint.labels))


@dataclass(frozen=True)
class Side:
    """One direction's verdict: isolated or not, allowed or not, and why."""

    direction: str
    isolated: bool
    allowed: bool
    selecting: tuple[str, ...] = ()  # policies that select the workload for it
    allowed_by: tuple[str, ...] = ()  # "ns/name ingress[0]" for every rule that allows

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "isolated": self.isolated,
                "allowed": self.allowed, "policies": list(self.selecting),
                "allowed_by": list(self.allowed_by)}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    egress: Side | None  # None: the source is not a workload (nothing to enforce there)
    ingress: Side | None
    # Between a workload and its own host: always allowed, policy is not consulted
    # (the packets take the input and output hooks; policy is enforced in forward).
    own_host: bool = False


def side(direction: str, policies: Iterable[NetworkPolicy], subject: Endpoint,
         other_address: str, other: Endpoint | None,
         namespaces: Mapping[str, Mapping[str, str]], protocol: str, port: int) -> Side:
    selecting = [p for p in policies if p.applies(direction) and selects(p, subject)]
    allowed_by = []
    for policy in selecting:
        for index, rule in enumerate(policy.rules(direction)):
            if not rule.port_matches(protocol, port):
                continue
            if not rule.peers or any(peer_matches(peer, policy.namespace, other_address,
                                                  other, namespaces) for peer in rule.peers):
                allowed_by.append(f"{policy.key} {direction}[{index}]")
    isolated = bool(selecting)
    return Side(direction, isolated, not isolated or bool(allowed_by),
                tuple(p.key for p in selecting), tuple(allowed_by))


def decide(policies: Iterable[NetworkPolicy], namespaces: Mapping[str, Mapping[str, str]],
           source: str, destination: str, endpoints: Mapping[str, Endpoint],
           protocol: str = "TCP", port: int = 80,
           hosts: Mapping[str, str] | None = None) -> Decision:
    """May `source` open a connection to `destination` (addresses)? `endpoints` maps
    every workload address to its workload, `hosts` every host address to its node:
    traffic between a workload and its own host always passes."""
    policies = list(policies)
    src, dst = endpoints.get(source), endpoints.get(destination)
    hosts = hosts or {}
    if (src is not None and hosts.get(destination) == src.node) or \
            (dst is not None and hosts.get(source) == dst.node):
        return Decision(True, None, None, own_host=True)
    egress = side("egress", policies, src, destination, dst, namespaces, protocol, port) \
        if src else None
    ingress = side("ingress", policies, dst, source, src, namespaces, protocol, port) \
        if dst else None
    allowed = (egress is None or egress.allowed) and (ingress is None or ingress.allowed)
    return Decision(allowed, egress, ingress)
