"""The compiler against the reference semantics: random policies, workloads spread over
hosts, IPv4 and IPv6; every connection is run through the rendered rulesets of the
hosts on its path (egress at the source's host, ingress at the destination's) and must
get the verdict `decide` gives. Plus the shape promises: sets per selector, a new
workload changes set elements only, the ruleset does not grow with the workloads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.model.policy import Endpoint, decide, parse_policy
from fabric.policy.compiler import (
    SPOOF_COMMENT,
    HostRules,
    Listed,
    Packet,
    compile_host,
    element_changes,
    evaluate,
    expected_summary,
    jumps,
    new_handles,
    policy_chain,
    render,
    structure_changes_text,
)

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
HOSTS = ("h1", "h2", "h3")


def endpoints(v6: bool = True) -> list[Endpoint]:
    out = []
    for index, (ns, pod) in enumerate(itertools.product(NAMESPACES, PODS)):
        ips = (f"10.244.{index}.1",) + ((f"fd00::{index + 1:x}",) if v6 else ())
        out.append(Endpoint(f"{ns}-{pod}", ns, pod, {"pod": pod, "ns-pod": f"{ns}{pod}"},
                            ips, HOSTS[index % 3], f"l3f{index:012d}"))
    return out


EXTERNAL = ("192.0.2.10", "10.244.200.1", "2001:db8::1")


def listed(rules: HostRules) -> Listed:
    """The rendered batch read back as `nft -j list table` would print it."""
    return Listed.parse(next(iter(cmd.values())) for cmd in render(rules)[3:])


def fabric_allows(per_host: dict[str, Listed], src: str, dst: str, by_address, protocol,
                  port) -> bool:
    """Run the connection's first packet through every host on its path."""
    s, d = by_address.get(src), by_address.get(dst)
    hosts = []
    if s is not None:
        hosts.append(s.node)
    if d is not None and (s is None or d.node != s.node):
        hosts.append(d.node)
    for host in hosts:
        packet = Packet(src, dst, protocol.lower(), port,
                        s.host_ifname if s is not None and s.node == host else "eth0",
                        d.host_ifname if d is not None and d.node == host else "eth0")
        verdict, _ = evaluate(per_host[host], packet)
        if verdict != "accept":
            return False
    return True


labels = st.sampled_from([{}, {"pod": "a"}, {"pod": "b"}, {"ns-pod": "xa"}])
expressions = st.lists(st.sampled_from([
    {"key": "pod", "operator": "In", "values": ["a", "c"]},
    {"key": "pod", "operator": "NotIn", "values": ["b"]},
    {"key": "team", "operator": "Exists"},
    {"key": "team", "operator": "DoesNotExist"}]), max_size=1)
selector = st.builds(lambda m, e: {"matchLabels": m, "matchExpressions": e}, labels,
                     expressions)
peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selector),
    st.builds(lambda s: {"namespaceSelector": s}, selector),
    st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, selector, selector),
    st.sampled_from([{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.4.0/24"]}},
                     {"ipBlock": {"cidr": "10.244.0.0/20"}},
                     {"ipBlock": {"cidr": "192.0.2.0/24"}},
                     {"ipBlock": {"cidr": "fd00::/112", "except": ["fd00::4/126"]}}]))
port = st.sampled_from([{"port": 80}, {"port": 81, "protocol": "UDP"},
                        {"port": 80, "endPort": 81}, {"protocol": "UDP"},
                        {"port": "http"}, {"port": 8080}])
rule = st.builds(lambda peers, ports: {"from": peers, "ports": ports},
                 st.lists(peer, max_size=2), st.lists(port, max_size=2))
policy = st.builds(
    lambda ns, sel, types, ingress, egress: (ns, {
        "podSelector": sel, "policyTypes": types, "ingress": ingress,
        "egress": [{"to": r["from"], "ports": r["ports"]} for r in egress]}),
    st.sampled_from(NAMESPACES), selector,
    st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
    st.lists(rule, max_size=2), st.lists(rule, max_size=2))


def build(specs) -> list:
    return [parse_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": {"name": f"p{i}", "namespace": ns}, "spec": spec})
            for i, (ns, spec) in enumerate(specs)]


@settings(max_examples=60, deadline=None)
@given(st.lists(policy, max_size=4),
       st.dictionaries(st.sampled_from(NAMESPACES), st.sampled_from([{"team": "blue"}]),
                       max_size=2))
def test_rendered_rulesets_agree_with_the_reference_semantics(specs, namespaces):
    policies = build(specs)
    everyone = endpoints()
    per_host = {h: listed(compile_host(policies, namespaces, everyone,
                                       [e for e in everyone if e.node == h]))
                for h in HOSTS}
    by_address = {a: e for e in everyone for a in e.ips}
    sources = [a for e in everyone for a in e.ips] + list(EXTERNAL)
    for src, dst in itertools.product(sources, [a for e in everyone for a in e.ips]):
        if src == dst or (":" in src) != (":" in dst):
            continue
        for protocol, number in (("TCP", 80), ("TCP", 81), ("UDP", 81), ("UDP", 80)):
            expected = decide(policies, namespaces, src, dst, by_address, protocol,
                              number).allowed
            got = fabric_allows(per_host, src, dst, by_address, protocol, number)
            assert got == expected, (src, dst, protocol, number, specs, namespaces)


DENY_ALL = ("x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
ALLOW_B = ("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                                       {"ipBlock": {"cidr": "10.0.0.0/8",
                                                    "except": ["10.1.0.0/16"]}}],
                              "ports": [{"port": 80}, {"port": 81},
                                        {"port": 90, "endPort": 99}]}]})


def test_a_new_workload_changes_set_elements_only():
    everyone = endpoints()
    local = [e for e in everyone if e.node == "h1"]
    before = compile_host(build([DENY_ALL, ALLOW_B]), {}, everyone[:-1],
                          [e for e in local if e in everyone[:-1]])
    newcomer = Endpoint("x-d", "x", "d", {"pod": "b"}, ("10.244.50.1", "fd00::50"), "h1",
                        "l3f999999999999")
    after = compile_host(build([DENY_ALL, ALLOW_B]), {}, [*everyone, newcomer],
                         [*local, newcomer])
    assert after.structure() == before.structure()
    changes = element_changes(before, after)
    assert changes and all(set(c.get("add", c.get("delete", {}))) == {"element"}
                           for c in changes)
    added = {a for c in changes if "add" in c for a in c["add"]["element"]["elem"]}
    assert {"10.244.50.1", "fd00::50"} <= added
    assert element_changes(after, after) == []


def test_the_ruleset_grows_with_policies_not_with_workloads():
    policies = build([DENY_ALL, ALLOW_B])
    few = endpoints()
    many = [Endpoint(f"x-{i}", "x", f"w{i}", {"pod": "ab"[i % 2]},
                     (f"10.245.{i // 250}.{i % 250}",), "h1", f"l3f{i:012d}")
            for i in range(1000)]
    small = compile_host(policies, {}, few, [e for e in few if e.node == "h1"])
    large = compile_host(policies, {}, few + many, [e for e in few if e.node == "h1"] + many)
    assert len(large.rules) == len(small.rules)
    assert [s.name for s in large.sets] == [s.name for s in small.sets]
    assert sum(len(s.elements) for s in large.sets) > 1000


def test_shape_of_the_table():
    everyone = endpoints()
    rules = compile_host(build([DENY_ALL, ALLOW_B]), {}, everyone,
                         [e for e in everyone if e.node == "h1"], families=(4, 6))
    table = listed(rules)
    assert table.summary() == expected_summary(rules)
    forward = table.chains["forward"]
    assert forward[0]["comment"] == "replies of allowed connections"
    assert [r["comment"] for r in table.chains["ingress_rules"]] == ["x/p1"]  # a jump
    assert [r["comment"] for r in table.chains[policy_chain("x/p1", "ingress")]] == [
        "x/p1 ingress[0]"] * 3  # the pods' set in 2 families, the v4 block
    assert [r["comment"] for r in table.chains["ingress"]] == [
        "the policies' ingress rules"] + ["isolated for ingress"] * 2
    assert any(name.startswith("ports_") for name, _ in rules.port_sets)
    cidr = next(s for s in rules.sets if s.interval and s.family == 4)
    assert sorted(cidr.elements) == ["10.0.0.0/16", "10.2.0.0-10.255.255.255"]  # 10/8 - 10.1/16
    # a replay of an established connection passes whatever the policies say
    x_a = next(e for e in everyone if e.key == "x/a")
    reply = Packet("192.0.2.99", x_a.ips[0], "tcp", 9, "eth0", x_a.host_ifname,
                   "established")
    assert evaluate(table, reply)[0] == "accept"
    new = Packet("192.0.2.99", x_a.ips[0], "tcp", 9, "eth0", x_a.host_ifname)
    assert evaluate(table, new)[0] == "reject"


def test_no_policies_means_an_open_table_and_traffic_to_the_host_is_not_hooked():
    everyone = endpoints()
    rules = compile_host([], {}, everyone, everyone[:3])
    table = listed(rules)
    assert rules.rules == ()
    for src, dst in itertools.permutations([e.ips[0] for e in everyone[:3]], 2):
        assert evaluate(table, Packet(src, dst, "tcp", 80, "l3fa", "l3fb"))[0] == "accept"
    # policy has only the forward hook: nothing judges workload <-> its own host; the
    # prerouting hook only drops forged sources from workloads (policy or not)
    chains = [c for c in render(rules) if "chain" in c.get("add", {})]
    assert [c["add"]["chain"].get("hook") for c in chains if "hook" in c["add"]["chain"]] \
        == ["forward", "prerouting"]
    assert {r["comment"] for r in table.chains["prerouting"]} == {SPOOF_COMMENT}
    assert all({"drop": None} in r["expr"] for r in table.chains["prerouting"])


def test_a_policy_change_touches_that_policys_chain_and_sets_only():
    everyone = endpoints()
    local = [e for e in everyone if e.node == "h1"]
    old = compile_host(build([DENY_ALL, ALLOW_B]), {}, everyone, local)
    allow_c = ("x", {"podSelector": {"matchLabels": {"pod": "c"}},
                     "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    new = compile_host(build([DENY_ALL, allow_c]), {}, everyone, local)  # x/p1 changed
    (chain,) = old.policy_chains()
    assert chain == policy_chain("x/p1", "ingress") and old.policy_chains()[chain] == (
        "ingress", "x/p1")
    text, added = structure_changes_text(old, new, {chain: 77})
    lines = text.splitlines()
    assert added == []  # the same policy: its chain is flushed and filled again
    assert lines[0] == f"flush chain inet l3fabric {chain}"
    assert any(line.startswith("delete set inet l3fabric cidr_") for line in lines)
    assert any(line.startswith("add set inet l3fabric peer_") for line in lines)
    assert [line for line in lines if line.startswith("add rule")] == [
        f"add rule inet l3fabric {chain} " + line.split(" ", 5)[5]
        for line in lines if line.startswith("add rule")]
    assert len([line for line in lines if line.startswith("add rule")]) == len(new.rules)
    assert "delete rule" not in text  # no handle needed
    # a policy that goes: its jump (by handle), then its chain
    gone = compile_host(build([DENY_ALL]), {}, everyone, local)
    text, added = structure_changes_text(old, gone, {chain: 77})
    assert text.splitlines()[:3] == ["delete rule inet l3fabric ingress_rules handle 77",
                                     f"flush chain inet l3fabric {chain}",
                                     f"delete chain inet l3fabric {chain}"]
    assert structure_changes_text(old, gone, {}) is None  # the jump's handle is unknown
    # a policy that comes: its chain, its rules, a jump to it
    text, added = structure_changes_text(gone, old, {})
    assert added == [chain]
    assert text.splitlines()[-1] == (f'add rule inet l3fabric ingress_rules jump {chain} '
                                     'comment "x/p1"')
    assert jumps(old, added) == [("ingress_rules", chain)]
    # the jumps listed afterwards give their handles: those not known before
    assert new_handles({"ingress_rules": [5, 9], "egress_rules": [6]}, jumps(old, added),
                       known=[5, 6]) == {chain: 9}
    with pytest.raises(ValueError):
        new_handles({"ingress_rules": []}, jumps(old, added))
    # other families: the table is replaced instead; nothing changed: nothing to do
    assert structure_changes_text(old, compile_host(build([DENY_ALL]), {}, everyone, local,
                                                    families=(4,)), {chain: 77}) is None
    assert structure_changes_text(old, old, {}) == ("", [])
