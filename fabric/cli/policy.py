"""`fabricctl policy ...`, `namespace ...`, `workload label`: network policy in etcd, and
why a connection is allowed or denied."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from fabric.cli.context import Context
from fabric.cli.output import OK, PROBLEM, CliError, emit_json, kv, table
from fabric.model.policy import (
    DEFAULT_NAMESPACE,
    METADATA_NAME_LABEL,
    Endpoint,
    NetworkPolicy,
    PolicyError,
    Side,
    decide,
    namespace_labels,
    namespace_problem,
    parse_label_assignments,
    parse_policy,
    parse_reference,
)
from fabric.policy.compiler import Listed, Packet, evaluate
from fabric.store import policies as store_policies
from fabric.store.policies import LabelError
from fabric.store.registry import Registry


def register(sub: argparse._SubParsersAction) -> None:
    policy = sub.add_parser("policy", help="Kubernetes NetworkPolicy manifests")
    psub = policy.add_subparsers(dest="policy_cmd", required=True, metavar="COMMAND")
    apply = psub.add_parser("apply", help="create or update policies from YAML or JSON "
                            "(all documents valid, or nothing applied)")
    apply.add_argument("-f", "--filename", required=True, action="append",
                       help="file with one or more manifests ('-' reads stdin); repeatable")
    apply.set_defaults(handler=apply_cmd)
    listing = psub.add_parser("list", help="policies, all or of one namespace")
    listing.add_argument("-n", "--namespace", help="only this namespace")
    listing.set_defaults(handler=list_cmd)
    show = psub.add_parser("show", help="one policy's manifest and what it selects")
    show.add_argument("ref", metavar="NS/NAME")
    show.set_defaults(handler=show_cmd)
    remove = psub.add_parser("rm", help="delete a policy")
    remove.add_argument("ref", metavar="NS/NAME")
    remove.set_defaults(handler=rm_cmd)
    explain = psub.add_parser(
        "explain", help="may SRC open a connection to DST, and which policies decide it "
                        "(with --host: does that host's nftables agree)")
    explain.add_argument("source", metavar="SRC", help="workload (NS/NAME, NAME) or address")
    explain.add_argument("destination", metavar="DST", help="workload or address")
    explain.add_argument("--port", default="80/tcp", help="PORT/PROTOCOL (default 80/tcp)")
    explain.add_argument("--kernel", action="store_true",
                         help="also check this machine's agent's nftables table (implied "
                              "by --host, which checks that lab host's)")
    explain.set_defaults(handler=explain_cmd)

    namespace = sub.add_parser("namespace", help="namespace labels (for namespaceSelector)")
    nsub = namespace.add_subparsers(dest="namespace_cmd", required=True, metavar="COMMAND")
    label = nsub.add_parser("label", help="set (k=v) or remove (k-) a namespace's labels")
    label.add_argument("name", metavar="NS")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    label.set_defaults(handler=namespace_label_cmd)
    nsub.add_parser("list", help="namespaces with workloads or labels"
                    ).set_defaults(handler=namespace_list_cmd)

    workload = sub.add_parser("workload", help="a workload's labels (for podSelector)")
    wsub = workload.add_subparsers(dest="workload_cmd", required=True, metavar="COMMAND")
    wlabel = wsub.add_parser("label", help="set (k=v) or remove (k-) a workload's labels")
    wlabel.add_argument("name", metavar="NAME", help="NS/NAME, NAME, handle or address")
    wlabel.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    wlabel.set_defaults(handler=workload_label_cmd)


# -- manifests -----------------------------------------------------------------------------
LIST_KINDS = ("List", "NetworkPolicyList")  # kubectl get -o yaml writes either


class _DuplicateKeys:
    """Mapping keys given twice, by the mapping that has them (keyed by `id`: the
    mappings stay alive until `check` has walked them). A loader that let the last one
    win would turn `ingress: []` then `ingress: [{}]` into allow-all; kubectl refuses
    ("mapping key ... already defined"), and so do we, with the field path."""

    def __init__(self) -> None:
        self.found: dict[int, list[Any]] = {}

    def json_object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                self.found.setdefault(id(out), []).append(key)
            out[key] = value
        return out

    def loader(self) -> type[yaml.SafeLoader]:
        found = self.found

        class Loader(yaml.SafeLoader):
            def construct_mapping(self, node: yaml.MappingNode, deep: bool = False
                                  ) -> dict[Any, Any]:
                mapping = super().construct_mapping(node, deep=deep)
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    if key in seen:
                        found.setdefault(id(mapping), []).append(key)
                    seen.add(key)
                return mapping

            def construct_yaml_map(self, node: yaml.MappingNode) -> Any:
                yield self.construct_mapping(node)  # one object: its id is what was checked

        Loader.add_constructor("tag:yaml.org,2002:map", Loader.construct_yaml_map)
        return Loader

    def check(self, docs: list[Any], where: list[str]) -> None:
        """CliError naming the first duplicate key's document and field path (walked
        without recursion: the input may be deep)."""
        if not self.found:
            return
        for doc, place in zip(docs, where, strict=True):
            stack: list[tuple[Any, str]] = [(doc, "")]
            walked: set[int] = set()  # YAML aliases share objects: walk each once
            while stack:
                value, path = stack.pop()
                if id(value) in walked:
                    continue
                walked.add(id(value))
                if isinstance(value, dict):
                    for key in self.found.get(id(value), ()):
                        field = f"{path}.{key}" if path else str(key)
                        raise CliError(f"{place}: {field}: mapping key {key!r} already "
                                       "defined; nothing was applied")
                    stack += [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
                elif isinstance(value, list):
                    stack += [(v, f"{path}[{i}]") for i, v in enumerate(value)]


def read_manifests(text: str, source: str) -> list[Any]:
    """Every document of a YAML stream (or one JSON document); `kind: List` (and
    `NetworkPolicyList`) unpacked. Refused (CliError, exit 2): a mapping key given twice,
    input nested too deeply for the parser."""
    duplicates = _DuplicateKeys()
    try:
        if text.lstrip().startswith(("{", "[")):
            loaded = json.loads(text, object_pairs_hook=duplicates.json_object)
            docs = loaded if isinstance(loaded, list) else [loaded]
        else:
            docs = [d for d in yaml.load_all(text, Loader=duplicates.loader())
                    if d is not None]
    except RecursionError as exc:
        raise CliError(f"{source}: nested too deeply to be a manifest; nothing was "
                       "applied") from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError(f"{source}: not YAML or JSON: {' '.join(str(exc).split())}") from exc
    duplicates.check(docs, [f"{source} document {i + 1}" for i in range(len(docs))])
    out: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in LIST_KINDS and isinstance(
                doc.get("items"), list):
            out.extend(doc["items"])
        else:
            out.append(doc)
    return out


def parse_manifests(docs: list[tuple[str, Any]]) -> list[NetworkPolicy]:
    """All or nothing: the first invalid document refuses the whole set, and so do two
    documents for one NS/NAME (which one was meant?)."""
    parsed = []
    first: dict[str, str] = {}
    for where, doc in docs:
        try:
            policy = parse_policy(doc)
        except PolicyError as exc:
            name = ""
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                meta = doc["metadata"]
                name = f" ({meta.get('namespace') or DEFAULT_NAMESPACE}/{meta.get('name')})"
            raise CliError(f"{where}{name}: {exc}; nothing was applied") from exc
        except RecursionError as exc:
            raise CliError(f"{where}: nested too deeply to be a manifest; nothing was "
                           "applied") from exc
        if policy.key in first:
            raise CliError(f"{where} ({policy.key}): the same policy as {first[policy.key]}; "
                           "nothing was applied")
        first[policy.key] = where
        parsed.append(policy)
    return parsed


def _read_text(filename: str) -> tuple[str, str]:
    """(text, name for messages) of a manifest file, or of stdin for `-`."""
    source = "stdin" if filename == "-" else filename
    try:
        raw = sys.stdin.buffer.read() if filename == "-" else Path(filename).read_bytes()
    except OSError as exc:
        raise CliError(f"{filename}: {exc.strerror}") from exc
    try:
        return raw.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        raise CliError(f"{source}: not UTF-8 text (byte {exc.start}); nothing was "
                       "applied") from exc


def apply_cmd(ctx: Context) -> int:
    docs: list[tuple[str, Any]] = []
    for filename in ctx.filename:
        text, source = _read_text(filename)
        found = read_manifests(text, source)
        docs += [(f"{source} document {i + 1}", d) for i, d in enumerate(found)]
    if not docs:
        raise CliError("no manifests found; nothing was applied")
    results = store_policies.apply_policies(ctx.store, parse_manifests(docs))
    if ctx.json:
        emit_json([{"policy": r.key, "outcome": r.outcome} for r in results])
    else:
        for result in results:
            print(f"networkpolicy {result.key} {result.outcome}")
    return OK


def _ports(policy: NetworkPolicy, direction: str) -> str:
    rules = policy.rules(direction)
    if not policy.applies(direction):
        return "-"
    if not rules:
        return "deny all"
    return f"{len(rules)} rule(s)"


def list_cmd(ctx: Context) -> int:
    problem = namespace_problem(ctx.namespace) if ctx.namespace is not None else None
    if problem:
        raise CliError(f"--namespace {problem}")
    found, skipped = store_policies.read_policies(ctx.store, ctx.namespace)
    _say_skipped(skipped)
    if ctx.json:
        emit_json([{"namespace": p.namespace, "name": p.name, "pod_selector":
                    p.selector.describe(), "policy_types": list(p.types),
                    "ingress_rules": len(p.ingress), "egress_rules": len(p.egress)}
                   for p in found])
        return OK
    table(["namespace", "name", "pod selector", "ingress", "egress"],
          [[p.namespace, p.name, p.selector.describe(), _ports(p, "ingress"),
            _ports(p, "egress")] for p in found])
    return OK


def _say_skipped(skipped: dict[str, str]) -> None:
    """Records left out of a listing are named on stderr, never hidden: the agents
    enforce them fail-closed (see docs/policy.md)."""
    for key, why in sorted(skipped.items()):
        print(f"fabricctl: skipped a policy record that does not parse: {key}: {why} "
              "(the agents enforce it fail-closed; rewrite it with `policy apply` or "
              "delete it)", file=sys.stderr)


def _policy_ref(text: str) -> tuple[str, str]:
    try:
        return parse_reference(text)
    except PolicyError as exc:
        raise CliError(str(exc)) from exc


def show_cmd(ctx: Context) -> int:
    namespace, name = _policy_ref(ctx.ref)
    try:
        found = store_policies.policy(ctx.store, namespace, name)
    except store_policies.UnreadablePolicy as exc:
        raise CliError(f"{exc} (the agents enforce it fail-closed; rewrite it with "
                       "`policy apply` or delete it with `policy rm`)", code=PROBLEM) from exc
    if found is None:
        raise CliError(f"no policy {namespace}/{name}", code=PROBLEM)
    endpoints = _endpoints(ctx)
    selected = sorted(e.key for e in endpoints if e.namespace == namespace
                      and found.selector.matches(e.labels))
    if ctx.json:
        emit_json({"manifest": found.manifest, "selects": selected})
        return OK
    print(yaml.safe_dump(_ordered(found.manifest), sort_keys=False).rstrip())
    print(f"# selects: {', '.join(selected) or 'no workload yet'}")
    return OK


def _ordered(manifest: Any) -> dict[str, Any]:
    """The manifest in the order people write it (etcd keeps keys sorted)."""
    doc = dict(manifest)
    spec = dict(doc.get("spec") or {})
    order = ("podSelector", "policyTypes", "ingress", "egress")
    doc["spec"] = {k: spec[k] for k in (*order, *sorted(set(spec) - set(order))) if k in spec}
    top = ("apiVersion", "kind", "metadata", "spec")
    return {k: doc[k] for k in (*top, *sorted(set(doc) - set(top))) if k in doc}


def rm_cmd(ctx: Context) -> int:
    namespace, name = _policy_ref(ctx.ref)
    if not store_policies.remove_policy(ctx.store, namespace, name):
        raise CliError(f"no policy {namespace}/{name}", code=PROBLEM)
    if ctx.json:
        emit_json({"policy": f"{namespace}/{name}", "outcome": "deleted"})
    else:
        print(f"networkpolicy {namespace}/{name} deleted")
    return OK


# -- labels ------------------------------------------------------------------------------
def _assignments(words: list[str]) -> tuple[dict[str, str], list[str]]:
    try:
        return parse_label_assignments(words)
    except PolicyError as exc:
        raise CliError(str(exc)) from exc


def namespace_label_cmd(ctx: Context) -> int:
    problem = namespace_problem(ctx.name)
    if problem:
        raise CliError(problem)
    set_, remove = _assignments(ctx.labels)
    if METADATA_NAME_LABEL in set_ or METADATA_NAME_LABEL in remove:
        raise CliError(f"{METADATA_NAME_LABEL} is set by the fabric to the namespace's own "
                       "name and cannot be set or removed")
    labels = store_policies.label_namespace(ctx.store, ctx.name, set_, remove)
    shown = namespace_labels(ctx.name, {ctx.name: labels})
    if ctx.json:
        emit_json({"namespace": ctx.name, "labels": shown})
    else:
        print(f"namespace {ctx.name} labelled: {_labels_text(shown)}")
    return OK


def namespace_list_cmd(ctx: Context) -> int:
    stored = store_policies.namespaces(ctx.store)
    counts: dict[str, int] = {}
    for endpoint in _endpoints(ctx):
        counts[endpoint.namespace] = counts.get(endpoint.namespace, 0) + 1
    rows: list[dict[str, Any]] = [{"namespace": ns, "labels": namespace_labels(ns, stored),
             "workloads": counts.get(ns, 0)} for ns in sorted(set(stored) | set(counts))]
    if ctx.json:
        emit_json(rows)
        return OK
    table(["namespace", "workloads", "labels"],
          [[r["namespace"], r["workloads"], _labels_text(r["labels"])] for r in rows])
    return OK


def workload_label_cmd(ctx: Context) -> int:
    set_, remove = _assignments(ctx.labels)
    try:
        updated = store_policies.label_workload(ctx.store, ctx.name, set_, remove)
    except LabelError as exc:
        raise CliError(str(exc), code=PROBLEM) from exc
    key = f"{updated.namespace or DEFAULT_NAMESPACE}/{updated.name}"
    if ctx.json:
        emit_json({"workload": key, "handle": updated.handle, "labels": updated.labels})
    else:
        print(f"workload {key} labelled: {_labels_text(updated.labels) or '(none)'}")
    return OK


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# -- explain -------------------------------------------------------------------------------
def _endpoints(ctx: Context) -> list[Endpoint]:
    return [Endpoint.of(w) for w in Registry(ctx.store).workloads()]


def resolve(reference: str, endpoints: list[Endpoint]) -> tuple[str, Endpoint | None]:
    """(address, workload or None) for `NS/NAME`, `NAME`, a handle or an address."""
    try:
        address = str(ipaddress.ip_address(reference))
    except ValueError:
        address = ""
    if address:
        owner = next((e for e in endpoints if address in e.ips), None)
        return address, owner
    matches = [e for e in endpoints if reference in (e.key, e.name, e.handle)]
    if not matches:
        raise CliError(f"no workload {reference} (use NAMESPACE/NAME, NAME or an address)",
                       code=PROBLEM)
    if len(matches) > 1:
        raise CliError(f"{reference} names {len(matches)} workloads "
                       f"({', '.join(sorted(e.key for e in matches))}): use NAMESPACE/NAME",
                       code=PROBLEM)
    return matches[0].ips[0], matches[0]


def parse_port(text: str) -> tuple[int, str]:
    port_text, _, protocol = text.partition("/")
    protocol = (protocol or "tcp").upper()
    if protocol not in ("TCP", "UDP", "SCTP") or not port_text.isdigit() \
            or not 1 <= int(port_text) <= 65535:
        raise CliError(f"--port {text!r}: use PORT/PROTOCOL, e.g. 80/tcp or 53/udp")
    return int(port_text), protocol


def _side_text(verdict: Side | None, who: str) -> str:
    if verdict is None:
        return f"not enforced ({who} is not a workload)"
    if not verdict.isolated:
        return f"allowed: {who} is not isolated (no policy selects it for {verdict.direction})"
    if verdict.allowed:
        return f"allowed by {', '.join(verdict.allowed_by)} (isolated by " \
               f"{', '.join(verdict.selecting)})"
    return f"DENIED: isolated by {', '.join(verdict.selecting)}, and no rule allows it"


def explain_cmd(ctx: Context) -> int:
    port, protocol = parse_port(ctx.port)
    endpoints = _endpoints(ctx)
    src_addr, src = resolve(ctx.source, endpoints)
    dst_addr, dst = resolve(ctx.destination, endpoints)
    if (":" in src_addr) != (":" in dst_addr):
        if _is_address(ctx.source) and _is_address(ctx.destination):
            raise CliError(f"{ctx.source} and {ctx.destination} are of different address "
                           "families (IPv4 and IPv6): no connection between them exists")
        src_addr, dst_addr = _same_family(src, src_addr, dst, dst_addr)
    found, skipped = store_policies.read_policies(ctx.store)
    _say_skipped(skipped)
    spaces = store_policies.namespaces(ctx.store)
    by_address = {a: e for e in endpoints for a in e.ips}
    hosts = {a: n.name for n in Registry(ctx.store).nodes() for a in (n.address, n.address6)
             if a}
    decision = decide(found, spaces, src_addr, dst_addr, by_address, protocol, port, hosts)
    doc: dict[str, Any] = {
        "source": {"address": src_addr, "workload": src.key if src else None,
                   "node": src.node if src else None},
        "destination": {"address": dst_addr, "workload": dst.key if dst else None,
                        "node": dst.node if dst else None},
        "port": port, "protocol": protocol.lower(), "allowed": decision.allowed,
        "own_host": decision.own_host,
        "egress": decision.egress.to_dict() if decision.egress else None,
        "ingress": decision.ingress.to_dict() if decision.ingress else None}
    host = getattr(ctx.args, "host", None) or ("this host" if ctx.kernel else None)
    agrees = True
    if host:
        doc["host"] = _host_check(ctx, host, src_addr, src, dst_addr, dst, protocol, port,
                                  decision)
        agrees = doc["host"]["agrees"]
    if ctx.json:
        emit_json(doc)
        return OK if agrees else PROBLEM
    who_src = f"{src.key} ({src_addr} on {src.node})" if src else src_addr
    who_dst = f"{dst.key} ({dst_addr} on {dst.node})" if dst else dst_addr
    print(f"{who_src} -> {who_dst} {port}/{protocol.lower()}: "
          f"{'ALLOWED' if decision.allowed else 'DENIED'}")
    rows = [("own host", OWN_HOST)] if decision.own_host else [
        ("egress at source", _side_text(decision.egress, "the source")),
        ("ingress at destination", _side_text(decision.ingress, "the destination"))]
    if host:
        check = doc["host"]
        if check["on_path"]:
            rows.append((f"nftables on {host}",
                         f"{check['verdict']} ({'agrees' if check['agrees'] else 'DISAGREES'} "
                         f"with the model): " + "; ".join(check["trail"])))
        else:
            rows.append((f"nftables on {host}", "not on the path (neither end lives there)"))
    kv(rows)
    return OK if agrees else PROBLEM


OWN_HOST = ("allowed: traffic between a workload and its own host always passes (it takes "
            "the input and output hooks; policy is enforced in forward)")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _same_family(src: Endpoint | None, src_addr: str, dst: Endpoint | None, dst_addr: str
                 ) -> tuple[str, str]:
    """Both ends in one family: a workload's address of the other end's family."""
    for family_v6 in (":" in dst_addr, ":" in src_addr):
        s = src_addr if src is None else next(
            (a for a in src.ips if (":" in a) == family_v6), None)
        d = dst_addr if dst is None else next(
            (a for a in dst.ips if (":" in a) == family_v6), None)
        if s and d and (":" in s) == (":" in d):
            return s, d
    raise CliError(f"{src_addr} and {dst_addr} have no address family in common")


def _host_check(ctx: Context, host: str, src_addr: str, src: Endpoint | None, dst_addr: str,
                dst: Endpoint | None, protocol: str, port: int, decision: Any
                ) -> dict[str, Any]:
    answer = ctx.agent("policy")
    node = answer.get("node", host)
    src_local = src is not None and src.node == node
    dst_local = dst is not None and dst.node == node
    out: dict[str, Any] = {"name": host, "node": node, "on_path": src_local or dst_local,
                           "status": answer.get("status")}
    if not out["on_path"]:
        out.update(verdict=None, agrees=True, trail=[])
        return out
    listing = answer.get("listing")
    if listing is None:
        out.update(verdict="no table", agrees=False,
                   trail=[answer.get("error") or "table inet l3fabric is missing"])
        return out
    if decision.own_host:
        hooked = sorted({base[1] for base in Listed.parse(listing).bases.values()}
                        & {"input", "output"})
        verdict = "reject" if hooked else "accept"
        out.update(verdict=verdict, agrees=verdict == "accept", expected="accept",
                   trail=[f"own host: the table hooks {', '.join(hooked)}" if hooked else
                          "own host: the table has no input or output chain"])
        return out
    packet = Packet(src_addr, dst_addr, protocol.lower(), port,
                    (src.host_ifname or "l3f-source") if src_local else "eth0",
                    (dst.host_ifname or "l3f-destination") if dst_local else "eth0")
    verdict, trail = evaluate(Listed.parse(listing), packet)
    expected = (not src_local or decision.egress.allowed) and \
        (not dst_local or decision.ingress.allowed)
    out.update(verdict=verdict, agrees=(verdict == "accept") == expected, trail=trail,
               expected="accept" if expected else "reject")
    return out
