"""A workload's namespace and labels as the CNI plugin reads them: K8S_POD_NAMESPACE in
CNI_ARGS (as kubelet and containerd send it), labels from the network configuration's
args.cni.labels (the CNI conventions) and runtimeConfig.labels."""

from __future__ import annotations

import json

import pytest

from cni.netconf import parse_request
from cni.spec import INVALID_CONFIG, INVALID_ENV, CniError


def request(cni_args: str = "", **conf):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/n",
           "CNI_IFNAME": "eth0", "CNI_ARGS": cni_args}
    doc = {"cniVersion": "1.0.0", "name": "net", "type": "l3fabric", **conf}
    return parse_request(env, json.dumps(doc).encode())


def test_namespace_and_name_from_kubelet_args():
    req = request("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
    assert req.pod_namespace == "shop" and req.workload_name == "web-1"
    assert request().pod_namespace == "default"


def test_labels_from_args_and_runtime_config_the_latter_winning():
    req = request(args={"cni": {"labels": [{"key": "app", "value": "web"},
                                           {"key": "tier", "value": "a"}]}},
                  runtimeConfig={"labels": {"tier": "b"}})
    assert req.conf.labels == {"app": "web", "tier": "b"}


@pytest.mark.parametrize("conf", [
    {"runtimeConfig": {"labels": ["app=web"]}},
    {"runtimeConfig": {"labels": {"app": "not valid"}}},
    {"args": {"cni": {"labels": [{"app": "web"}]}}}])
def test_bad_labels_are_refused(conf):
    with pytest.raises(CniError) as caught:
        request(**conf)
    assert caught.value.code == INVALID_CONFIG


def test_a_bad_namespace_is_refused():
    with pytest.raises(CniError) as caught:
        request("K8S_POD_NAMESPACE=Not_A_Namespace")
    assert caught.value.code == INVALID_ENV


@pytest.mark.parametrize("cni_args, conf", [
    ("K8S_POD_NAMESPACE=Evil_NS", {}),
    ("K8S_POD_NAMESPACE=x/y", {}),
    ("K8S_POD_NAMESPACE=" + "n" * 70, {}),
    ("", {"runtimeConfig": {"labels": {"bad key": "v"}}}),
    ("", {"runtimeConfig": {"labels": {"k": 5}}}),
    ("", {"runtimeConfig": {"labels": ["a"]}}),
    ("", {"args": {"cni": {"labels": [{"app": "web"}]}}})])
def test_del_and_gc_ignore_the_policy_args_a_refused_add_had(cni_args, conf):
    """ADD refuses them; the runtime then sends DEL with the same arguments, which must
    not fail on them (nor GC, whose configuration may carry the same labels)."""
    with pytest.raises(CniError):
        request(cni_args, **conf)
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
           "CNI_ARGS": cni_args}
    doc = {"cniVersion": "1.0.0", "name": "net", "type": "l3fabric", **conf}
    req = parse_request(env, json.dumps(doc).encode())
    assert req.conf.labels == {} and req.pod_namespace == "default"
    gc = parse_request({"CNI_COMMAND": "GC"}, json.dumps(
        {**doc, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}).encode())
    assert gc.conf.labels == {}
