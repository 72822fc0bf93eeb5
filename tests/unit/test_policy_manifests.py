"""Reading policy manifests as `fabricctl policy apply` does: what is refused before
anything is parsed as a policy (duplicate keys, duplicate policies, deep nesting, bytes
that are not UTF-8) and the list kinds. Pure: no etcd."""

from __future__ import annotations

import json

import pytest

from fabric.cli.output import ERROR, CliError
from fabric.cli.policy import _read_text, parse_manifests, read_manifests

POLICY = ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
          "metadata: {name: p, namespace: y}\n")


def refused(text: str) -> str:
    with pytest.raises(CliError) as caught:
        parse_manifests([(f"f.yaml document {i + 1}", d)
                         for i, d in enumerate(read_manifests(text, "f.yaml"))])
    assert caught.value.code == ERROR
    return str(caught.value)


def test_a_duplicate_mapping_key_is_refused_with_its_path_yaml_and_json():
    text = POLICY + "spec:\n  podSelector: {}\n  ingress: []\n  ingress:\n  - {}\n"
    assert refused(text) == ("f.yaml document 1: spec.ingress: mapping key 'ingress' "
                             "already defined; nothing was applied")
    deep = POLICY + ("spec:\n  podSelector: {}\n  ingress:\n  - from:\n"
                     "    - podSelector: {matchLabels: {pod: a, pod: b}}\n")
    assert "spec.ingress[0].from[0].podSelector.matchLabels.pod: mapping key 'pod'" \
        in refused("---\n" + POLICY + "spec: {}\n---\n" + deep).replace("document 2", "")
    as_json = ('{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", '
               '"metadata": {"name": "p", "namespace": "y"}, '
               '"spec": {"podSelector": {}, "ingress": [], "ingress": [{}]}}')
    assert refused(as_json) == ("f.yaml document 1: spec.ingress: mapping key 'ingress' "
                                "already defined; nothing was applied")


def test_two_documents_for_one_policy_are_refused_naming_both():
    text = POLICY + "spec: {podSelector: {}}\n---\n" + POLICY + \
        "spec: {podSelector: {}, ingress: [{}]}\n"
    assert refused(text) == ("f.yaml document 2 (y/p): the same policy as f.yaml "
                             "document 1; nothing was applied")


@pytest.mark.parametrize("text", ["[" * 100000, "{\"a\": " * 100000,
                                  "a:\n" + "".join(f"{' ' * i}- \n" for i in range(1, 5000)),
                                  "[" * 5000 + "]" * 5000])
def test_deep_nesting_is_a_clear_error_not_a_crash(text):
    message = refused(text)
    assert message.startswith("f.yaml") and "nested too deeply" in message


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(POLICY.encode() + "spec: {podSelector: {matchLabels: {a: caf\xe9}}}\n"
                     .encode("latin-1"))
    with pytest.raises(CliError) as caught:
        _read_text(str(path))
    assert caught.value.code == ERROR
    assert str(caught.value).startswith(f"{path}: not UTF-8 text")


def test_a_network_policy_list_is_a_list():
    item = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "y"}, "spec": {"podSelector": {}}}
    for kind in ("List", "NetworkPolicyList"):
        text = json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": kind,
                           "items": [item]})
        (policy,) = parse_manifests([("d", d) for d in read_manifests(text, "f.json")])
        assert policy.key == "y/p"
