"""NetworkPolicy manifests: what is accepted, what is refused (with the field path), and
the reference semantics of `decide`, case by case from the Kubernetes documentation."""

from __future__ import annotations

import copy

import pytest

from fabric.model.policy import (
    Endpoint,
    PolicyError,
    decide,
    parse_label_assignments,
    parse_policy,
)


def manifest(spec: dict, name: str = "p", namespace: str | None = "x") -> dict:
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": spec}


FULL = manifest({
    "podSelector": {"matchLabels": {"app": "db"},
                    "matchExpressions": [{"key": "tier", "operator": "In",
                                          "values": ["a", "b"]}]},
    "policyTypes": ["Ingress", "Egress"],
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}},
                           "namespaceSelector": {"matchExpressions": [
                               {"key": "team", "operator": "Exists"}]}},
                          {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                 "ports": [{"protocol": "TCP", "port": 5432},
                           {"protocol": "UDP", "port": 1000, "endPort": 2000},
                           {"protocol": "SCTP"}, {"port": "metrics"}]}],
    "egress": [{"to": [{"ipBlock": {"cidr": "fd00::/8"}}]}, {}],
})


def test_a_full_manifest_parses_and_keeps_its_meaning():
    policy = parse_policy(FULL)
    assert policy.key == "x/p"
    assert policy.types == ("Ingress", "Egress")
    rule = policy.ingress[0]
    assert rule.peers[0].pods.describe() == "app=web"
    assert rule.peers[0].namespaces.describe() == "team"
    assert rule.peers[1].block.excepts == ("10.1.0.0/16",)
    assert [p.describe() for p in rule.ports] == ["5432/tcp", "1000-2000/udp", "any/sctp",
                                                  "metrics/tcp"]
    assert policy.egress[1].peers == () and policy.egress[1].ports == ()
    assert parse_policy(policy.to_record()["manifest"]) == policy  # the stored record


def test_defaults_namespace_and_policy_types():
    policy = parse_policy(manifest({"podSelector": {}}, namespace=None))
    assert policy.namespace == "default" and policy.types == ("Ingress",)
    with_egress = parse_policy(manifest({"podSelector": {}, "egress": [{}]}))
    assert with_egress.types == ("Ingress", "Egress")
    empty_egress = parse_policy(manifest({"podSelector": {}, "egress": []}))
    assert empty_egress.types == ("Ingress",)
    only_egress = parse_policy(manifest({"podSelector": {}, "policyTypes": ["Egress"]}))
    assert only_egress.types == ("Egress",)


def test_server_side_metadata_and_status_are_accepted_and_dropped():
    doc = copy.deepcopy(FULL)
    doc["metadata"].update(uid="1234", resourceVersion="9", generation=2,
                           creationTimestamp="2026-01-01T00:00:00Z")
    doc["status"] = {}
    policy = parse_policy(doc)
    assert set(policy.manifest["metadata"]) == {"name", "namespace"}
    assert "status" not in policy.manifest


def broken(path: list, value: object) -> dict:
    doc = copy.deepcopy(FULL)
    target = doc
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


REFUSED = [
    (broken(["apiVersion"], "networking.k8s.io/v1beta1"), "apiVersion"),
    (broken(["kind"], "Pod"), "kind"),
    (broken(["metadata", "name"], KeyError), "metadata.name"),
    (broken(["metadata", "name"], "Bad_Name"), "metadata.name"),
    (broken(["metadata", "namespace"], "X"), "metadata.namespace"),
    (broken(["spec", "podSelecter"], {}), "spec.podSelecter"),
    (broken(["spec", "policyTypes"], ["Ingress", "Sideways"]), "spec.policyTypes[1]"),
    (broken(["spec", "podSelector", "matchExpressions", 0, "operator"], "Maybe"),
     "spec.podSelector.matchExpressions[0].operator"),
    (broken(["spec", "podSelector", "matchExpressions", 0, "values"], []),
     "spec.podSelector.matchExpressions[0].values"),
    (broken(["spec", "ingress", 0, "from", 0, "namespaceSelector", "matchExpressions", 0,
             "values"], ["v"]),
     "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values"),
    (broken(["spec", "podSelector", "matchLabels"], {"app": "no spaces"}),
     "spec.podSelector.matchLabels.app"),
    (broken(["spec", "ingress", 0, "from", 1, "ipBlock", "cidr"], "10.0.0.0/33"),
     "spec.ingress[0].from[1].ipBlock.cidr"),
    (broken(["spec", "ingress", 0, "from", 1, "ipBlock", "except"], ["11.0.0.0/16"]),
     "spec.ingress[0].from[1].ipBlock.except[0]"),
    (broken(["spec", "ingress", 0, "from", 1, "ipBlock", "except"], ["10.0.0.0/8"]),
     "spec.ingress[0].from[1].ipBlock.except[0]"),
    (broken(["spec", "ingress", 0, "from", 1], {"ipBlock": {"cidr": "10.0.0.0/8"},
                                                 "podSelector": {}}),
     "spec.ingress[0].from[1]"),
    (broken(["spec", "ingress", 0, "from", 1], {}), "spec.ingress[0].from[1]"),
    (broken(["spec", "ingress", 0, "ports", 0, "protocol"], "ICMP"),
     "spec.ingress[0].ports[0].protocol"),
    (broken(["spec", "ingress", 0, "ports", 0, "port"], 70000),
     "spec.ingress[0].ports[0].port"),
    (broken(["spec", "ingress", 0, "ports", 0, "port"], "80"),
     "spec.ingress[0].ports[0].port"),
    (broken(["spec", "ingress", 0, "ports", 1, "endPort"], 999),
     "spec.ingress[0].ports[1].endPort"),
    (broken(["spec", "ingress", 0, "ports", 3, "endPort"], 9000),
     "spec.ingress[0].ports[3].endPort"),
    (broken(["spec", "egress", 0, "too"], []), "spec.egress[0].too"),
    (broken(["spec", "egress"], {"to": []}), "spec.egress"),
]


@pytest.mark.parametrize(("doc", "path"), REFUSED, ids=[p for _, p in REFUSED])
def test_invalid_manifests_are_refused_with_the_field_path(doc, path):
    with pytest.raises(PolicyError) as caught:
        parse_policy(doc)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")


def test_label_assignments_set_and_remove_like_kubectl():
    assert parse_label_assignments(["a=1", "b-", "example.com/c="]) == (
        {"a": "1", "example.com/c": ""}, ["b"])
    for bad in (["novalue"], ["=v"], ["a=b c"], ["-"]):
        with pytest.raises(PolicyError):
            parse_label_assignments(bad)


# -- the reference semantics -------------------------------------------------------------
XA = Endpoint("h1", "x", "a", {"pod": "a"}, ("10.0.0.1",))
XB = Endpoint("h2", "x", "b", {"pod": "b"}, ("10.0.0.2",))
YA = Endpoint("h3", "y", "a", {"pod": "a"}, ("10.0.1.1",))
BY_ADDRESS = {e.ips[0]: e for e in (XA, XB, YA)}


def allowed(specs, src, dst, protocol="TCP", port=80, namespaces=None):
    policies = [parse_policy(manifest(s, name=f"p{i}", namespace=ns))
                for i, (ns, s) in enumerate(specs)]
    return decide(policies, namespaces or {}, src, dst, BY_ADDRESS, protocol, port).allowed


def test_no_policy_allows_everything_and_isolation_is_per_direction():
    assert allowed([], "10.0.0.1", "10.0.0.2")
    deny_in = ("x", {"podSelector": {"matchLabels": {"pod": "b"}}})
    assert not allowed([deny_in], "10.0.0.1", "10.0.0.2")
    assert allowed([deny_in], "10.0.0.2", "10.0.0.1")  # b's egress is not isolated
    deny_out = ("x", {"podSelector": {}, "policyTypes": ["Egress"]})
    assert not allowed([deny_out], "10.0.0.1", "10.0.1.1")
    assert allowed([deny_out], "10.0.1.1", "10.0.0.1")  # ingress of x is not isolated
    # a policy of namespace y never selects a workload of x
    assert allowed([("y", {"podSelector": {}})], "10.0.1.1", "10.0.0.1")


def test_peers_pod_namespace_and_both():
    pods = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {
        "matchLabels": {"pod": "a"}}}]}]}
    assert allowed([("x", pods)], "10.0.0.1", "10.0.0.2")  # x/a: same namespace
    assert not allowed([("x", pods)], "10.0.1.1", "10.0.0.2")  # y/a: other namespace
    spaces = {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
        "matchLabels": {"team": "blue"}}}]}]}
    assert not allowed([("x", spaces)], "10.0.1.1", "10.0.0.2")
    assert allowed([("x", spaces)], "10.0.1.1", "10.0.0.2", namespaces={"y": {"team": "blue"}})
    both = {"podSelector": {}, "ingress": [{"from": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
        "podSelector": {"matchLabels": {"pod": "b"}}}]}]}
    assert not allowed([("x", both)], "10.0.1.1", "10.0.0.2")  # y/a is not pod=b
    either = {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}},
        {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}
    assert allowed([("x", either)], "10.0.1.1", "10.0.0.1")


def test_ip_block_with_except_and_ports():
    spec = {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
        "cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}],
        "ports": [{"port": 80}, {"protocol": "UDP", "port": 1000, "endPort": 1010}]}]}
    assert allowed([("x", spec)], "10.0.0.2", "10.0.0.1")
    assert not allowed([("x", spec)], "10.0.1.1", "10.0.0.1")  # in the except
    assert allowed([("x", spec)], "192.0.2.1", "10.0.0.1") is False  # outside the cidr
    assert not allowed([("x", spec)], "10.0.0.2", "10.0.0.1", port=81)
    assert allowed([("x", spec)], "10.0.0.2", "10.0.0.1", "UDP", 1005)
    assert not allowed([("x", spec)], "10.0.0.2", "10.0.0.1", "UDP", 80)


def test_allows_are_a_union_and_named_ports_match_nothing():
    deny = ("x", {"podSelector": {}})
    allow81 = ("x", {"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]})
    named = ("x", {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})
    assert not allowed([deny, named], "10.0.1.1", "10.0.0.1", port=80)
    assert allowed([deny, allow81], "10.0.1.1", "10.0.0.1", port=81)
    decision = decide([parse_policy(manifest(s, f"p{i}", ns))
                       for i, (ns, s) in enumerate([deny, allow81])], {}, "10.0.1.1",
                      "10.0.0.1", BY_ADDRESS, "TCP", 81)
    assert decision.ingress.selecting == ("x/p0", "x/p1")
    assert decision.ingress.allowed_by == ("x/p1 ingress[0]",)
    assert decision.egress.isolated is False


@pytest.mark.parametrize(("operator", "values", "labels", "expected"), [
    ("In", ["a", "b"], {"pod": "a"}, True), ("In", ["b"], {"pod": "a"}, False),
    ("In", ["a"], {}, False), ("NotIn", ["b"], {"pod": "a"}, True),
    ("NotIn", ["a"], {"pod": "a"}, False), ("NotIn", ["a"], {}, True),
    ("Exists", [], {"pod": ""}, True), ("Exists", [], {}, False),
    ("DoesNotExist", [], {}, True), ("DoesNotExist", [], {"pod": "a"}, False)])
def test_match_expressions(operator, values, labels, expected):
    doc = manifest({"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": operator, **({"values": values} if values else {})}]}})
    assert parse_policy(doc).selector.matches(labels) is expected


def test_empty_policy_types_are_defaulted_like_absent_ones():
    """`policyTypes: []` is defaulted as Kubernetes does (len == 0), not taken as
    "isolate nothing": that read failed open."""
    deny = parse_policy(manifest({"podSelector": {}, "policyTypes": []}))
    assert deny.types == ("Ingress",)
    with_egress = parse_policy(manifest({"podSelector": {}, "policyTypes": [],
                                         "egress": [{"to": [{"podSelector": {}}]}]}))
    assert with_egress.types == ("Ingress", "Egress")
    a = Endpoint("h1", "x", "a", {}, ("10.0.0.1",))
    b = Endpoint("h2", "x", "b", {}, ("10.0.0.2",))
    verdict = decide([deny], {}, "10.0.0.2", "10.0.0.1", {"10.0.0.1": a, "10.0.0.2": b})
    assert not verdict.allowed


def test_traffic_between_a_workload_and_its_own_host_is_allowed_both_ways():
    deny = parse_policy(manifest({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    a = Endpoint("h1", "x", "a", {}, ("10.0.0.1", "fd00::1"), "n1")
    by_address = {ip: a for ip in a.ips}
    hosts = {"10.99.0.11": "n1", "fd99::11": "n1", "10.99.0.12": "n2"}
    for src, dst in (("10.99.0.11", "10.0.0.1"), ("10.0.0.1", "10.99.0.11"),
                     ("fd99::11", "fd00::1")):
        verdict = decide([deny], {}, src, dst, by_address, hosts=hosts)
        assert verdict.allowed and verdict.own_host, (src, dst)
    other = decide([deny], {}, "10.99.0.12", "10.0.0.1", by_address, hosts=hosts)
    assert not other.allowed and not other.own_host  # another host is an ordinary source
