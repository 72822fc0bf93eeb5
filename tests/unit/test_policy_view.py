"""The agent's policy view with policy records it cannot parse: it fails closed (the
last good version, else deny-all in the record's namespace) and says so."""

from __future__ import annotations

from fabric.agent.policy import PolicyView
from fabric.model.policy import Endpoint, decide
from fabric.store import keys


def record(namespace: str, name: str, spec: dict) -> dict:
    return {"namespace": namespace, "name": name, "manifest": {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec}}


A = Endpoint("ha", "x", "a", {"pod": "a"}, ("10.0.0.1",))
B = Endpoint("hb", "x", "b", {"pod": "b"}, ("10.0.0.2",))
Y = Endpoint("hy", "y", "a", {"pod": "a"}, ("10.0.0.3",))
BY_ADDRESS = {e.ips[0]: e for e in (A, B, Y)}
BROKEN = {"podSelector": {}, "policyTypes": ["Ingres"]}  # etcdctl, a typo


def allowed(view: PolicyView, src: Endpoint, dst: Endpoint) -> bool:
    return decide(view.policies, {}, src.ips[0], dst.ips[0], BY_ADDRESS).allowed


def test_a_record_that_never_parsed_is_deny_all_in_its_namespace():
    view = PolicyView("h1")
    key = keys.policy("x", "locked")
    view.on_policies({key: record("x", "locked", BROKEN)})
    assert not allowed(view, B, A) and not allowed(view, A, Y)  # ingress and egress, x
    assert allowed(view, Y, Y)  # other namespaces untouched
    assert key in view.refused and "Ingres" in view.refused[key]
    assert "deny-all (ingress and egress) in namespace x" in view.refused[key]
    assert view.status()["refused"] == view.refused


def test_a_record_that_stops_parsing_keeps_its_last_good_version():
    view = PolicyView("h1")
    key = keys.policy("x", "only-b")
    good = record("x", "only-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"from": [{"podSelector": {
                                      "matchLabels": {"pod": "b"}}}]}]})
    view.on_policies({key: good})
    assert allowed(view, B, A) and not allowed(view, Y, A)
    for _ in range(2):  # and again at the next snapshot
        view.on_policies({key: record("x", "only-b", BROKEN)})
        assert allowed(view, B, A) and not allowed(view, Y, A)
        assert "its last good version" in view.refused[key]
    view.on_policies({key: good})  # repaired: no longer reported
    assert view.refused == {} and [p.key for p in view.policies] == ["x/only-b"]
    view.on_policies({})  # deleted: deleted
    assert view.policies == () and allowed(view, Y, A)


def test_an_unreadable_record_fails_closed_too_and_odd_names_stay_out_of_rules():
    view = PolicyView("h1")
    key = keys.policy("x", 'evil" accept')
    view.on_policies({}, {key: "not JSON"})
    (stand_in,) = view.policies
    assert stand_in.namespace == "x" and '"' not in stand_in.key
    assert not allowed(view, B, A)
    view.on_policies({}, {keys.POLICIES + "Not_A_Namespace/p": "not JSON"})
    assert view.policies == () and "nothing enforced" in next(iter(view.refused.values()))
