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
