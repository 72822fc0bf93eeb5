"""`fabricctl policy ...`, `namespace ...`, `workload label` as a user runs them: a
subprocess against a real etcd (no agents: what is stored, printed and refused)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.model.nodes import Workload
from fabric.store import keys
from fabric.store import policies as store_policies

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "networkpolicy.yaml"


@pytest.fixture
def ctl(etcd_server, store):
    def run(*argv: str, expect: int = 0, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "fabric.cli.main", "--etcd-endpoints",
             etcd_server.endpoint, *argv], capture_output=True, text=True, timeout=60,
            input=stdin)
        assert result.returncode == expect, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result
    return run


def workload(store, node: str, namespace: str, name: str, ip: str, **labels: str) -> None:
    record = Workload(f"{namespace}-{name}.eth0", node, f"{namespace}-{name}", "eth0", "/n",
                      (ip,), name, f"l3f{name}", namespace=namespace,
                      labels={"pod": name, **labels})
    store.put(keys.workload(node, record.handle), record.to_record())


def test_apply_is_all_or_nothing_idempotent_and_lists_shows_removes(ctl, store, tmp_path):
    out = ctl("policy", "apply", "-f", str(EXAMPLES)).stdout.splitlines()
    assert out == ["networkpolicy x/default-deny-ingress created",
                   "networkpolicy x/a-from-y-and-b created",
                   "networkpolicy z/egress-to-blue created"]
    again = json.loads(ctl("-o", "json", "policy", "apply", "-f", str(EXAMPLES)).stdout)
    assert {r["outcome"] for r in again} == {"unchanged"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLES.read_text().replace("name: a-from-y-and-b", "name: renamed")
                   + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                     "metadata: {name: broken, namespace: y}\n"
                     "spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n")
    err = ctl("policy", "apply", "-f", str(bad), expect=2).stderr
    assert err.strip() == (f"fabricctl: {bad} document 4 (y/broken): spec.ingress[0].ports[0]."
                           "port: 0 must be between 1 and 65535, inclusive; nothing was applied")
    assert [p.key for p in store_policies.policies(store)] == [
        "x/a-from-y-and-b", "x/default-deny-ingress", "z/egress-to-blue"]  # not x/renamed
    listed = json.loads(ctl("-o", "json", "policy", "list", "-n", "x").stdout)
    assert [(p["name"], p["policy_types"]) for p in listed] == [
        ("a-from-y-and-b", ["Ingress"]), ("default-deny-ingress", ["Ingress"])]
    workload(store, "h1", "x", "a", "10.244.0.1")
    shown = json.loads(ctl("-o", "json", "policy", "show", "x/a-from-y-and-b").stdout)
    assert shown["selects"] == ["x/a"]
    assert shown["manifest"]["spec"]["podSelector"] == {"matchLabels": {"pod": "a"}}
    assert "# selects: x/a" in ctl("policy", "show", "x/a-from-y-and-b").stdout
    ctl("policy", "rm", "x/a-from-y-and-b")
    ctl("policy", "rm", "x/a-from-y-and-b", expect=1)
    ctl("policy", "show", "x/nope", expect=1)
    stdin = json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "from-stdin"}, "spec": {}}]})
    assert ctl("policy", "apply", "-f", "-", stdin=stdin).stdout.strip() == \
        "networkpolicy default/from-stdin created"


def test_labels_and_explain(ctl, store):
    ctl("policy", "apply", "-f", str(EXAMPLES))
    workload(store, "h1", "x", "a", "10.244.0.1")
    workload(store, "h2", "y", "b", "10.244.0.2")
    workload(store, "h3", "z", "a", "10.244.0.3")
    assert ctl("namespace", "label", "y", "team=blue").stdout.strip() == \
        "namespace y labelled: kubernetes.io/metadata.name=y,team=blue"
    spaces = json.loads(ctl("-o", "json", "namespace", "list").stdout)
    assert {s["namespace"]: s["workloads"] for s in spaces} == {"x": 1, "y": 1, "z": 1}
    ctl("namespace", "label", "Y", "a=b", expect=2)
    ctl("workload", "label", "y/b", "bad label=1", expect=2)

    def explain(src: str, dst: str, port: str = "80/tcp") -> dict:
        return json.loads(ctl("-o", "json", "policy", "explain", src, dst, "--port",
                              port).stdout)

    doc = explain("y/b", "x/a")
    assert doc["allowed"] and doc["ingress"]["allowed_by"] == ["x/a-from-y-and-b ingress[0]"]
    assert doc["egress"]["isolated"] is False
    assert not explain("y/b", "x/a", "81/tcp")["allowed"]
    assert explain("z/a", "y/b")["allowed"]  # z may open connections to team=blue
    assert explain("z/a", "10.244.0.1")["egress"]["allowed"] is False  # x is not blue
    ctl("workload", "label", "10.244.0.2", "pod=c")  # by address
    record = store_policies.find_workload(store, "y/b")[1]
    assert record.labels == {"pod": "c"}
    ctl("namespace", "label", "y", "team-")
    assert not explain("z/a", "y/b")["allowed"]
    text = ctl("policy", "explain", "z/a", "y/b").stdout
    assert "DENIED" in text and "isolated by z/egress-to-blue" in text
    ctl("policy", "explain", "nobody", "y/b", expect=1)
    ctl("policy", "explain", "y/b", "x/a", "--port", "http", expect=2)


def test_a_record_that_does_not_parse_is_named_not_hidden(ctl, store):
    """A policy rewritten by etcdctl (a typo in policyTypes): `policy list` shows the
    others and names it on stderr, `policy show` names its key."""
    ctl("policy", "apply", "-f", str(EXAMPLES))
    key = keys.policy("x", "default-deny-ingress")
    value = store.get(key).value
    value["manifest"]["spec"]["policyTypes"] = ["Ingres"]
    store.put(key, value)
    listed = ctl("policy", "list")
    assert "default-deny-ingress" not in listed.stdout and "a-from-y-and-b" in listed.stdout
    assert f"skipped a policy record that does not parse: {key}: " \
           "spec.policyTypes[0]: Unsupported value: 'Ingres'" in listed.stderr
    shown = ctl("policy", "show", "x/default-deny-ingress", expect=1)
    assert f"policy record {key} does not parse: spec.policyTypes[0]" in shown.stderr


def test_explain_own_host_mixed_families_and_the_automatic_namespace_label(ctl, store):
    from fabric.model.nodes import Node

    ctl("policy", "apply", "-f", str(EXAMPLES))  # x denies all ingress
    workload(store, "h1", "x", "a", "10.244.0.1")
    store.put(keys.node("h1"), Node("h1", "10.99.0.11", 64512).to_record())
    store.put(keys.node("h2"), Node("h2", "10.99.0.12", 64512).to_record())
    own = json.loads(ctl("-o", "json", "policy", "explain", "10.99.0.11", "x/a").stdout)
    assert (own["allowed"], own["own_host"]) == (True, True)
    back = ctl("policy", "explain", "x/a", "10.99.0.11").stdout
    assert "ALLOWED" in back and "own host" in back
    other = json.loads(ctl("-o", "json", "policy", "explain", "10.99.0.12", "x/a").stdout)
    assert (other["allowed"], other["own_host"]) == (False, False)
    mixed = ctl("policy", "explain", "10.244.0.1", "fd00:244::b7", expect=2).stderr
    assert "different address families" in mixed
    for word in ("kubernetes.io/metadata.name=evil", "kubernetes.io/metadata.name-"):
        err = ctl("namespace", "label", "y", word, expect=2).stderr
        assert "kubernetes.io/metadata.name is set by the fabric" in err
    assert store.get(keys.namespace("y")) is None  # nothing written
