"""CNI input edge cases through the whole path: the installed plugin exec'd inside a lab
host's namespace, its real agent, real etcd. Each answer is the spec's error document
with the code the spec gives the problem, and the agent keeps serving afterwards."""

from __future__ import annotations

import json

import pytest

from cni import invoke
from cni.install import conflist
from fabric.kernel import netns
from fabric.store import keys
from tests.conftest import needs_root, running_lab

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture(scope="module")
def lab():
    with running_lab(pool="10.244.0.0/24", block_size=28) as lab:
        lab.add_host("h1")
        lab.wait_agent("h1")
        lab.install_cni()
        yield lab


def config(**changes: object) -> dict[str, object]:
    doc = invoke.network_config(conflist("testnet"))
    doc.update(changes)
    return doc


def run(lab, stdin: dict[str, object] | bytes, command: str = "ADD",
        container_id: str = "input1") -> invoke.Outcome:
    return invoke.run(str(lab.cni_bin / "l3fabric"), command, stdin,
                      container_id=container_id, netns="/proc/self/ns/net",
                      host_netns=netns.path(lab.state.hosts["h1"].netns))


def error(outcome: invoke.Outcome) -> dict[str, object]:
    assert outcome.status == 1, outcome
    doc = outcome.document
    assert isinstance(doc, dict) and set(doc) >= {"cniVersion", "code", "msg"}, outcome
    return doc


@pytest.mark.parametrize(("changes", "code", "text"), [
    ({"ipam": {"type": "l3fabric-ipam", "families": [[4]]}}, 7, "ipam.families"),
    ({"ipam": []}, 7, "ipam must be a JSON object"),
    ({"dns": []}, 7, "dns must be a JSON object"),
])
def test_config_edge_cases(lab, changes, code, text):
    doc = error(run(lab, config(**changes)))
    assert doc["code"] == code and text in str(doc["msg"])


def test_deep_nesting_is_a_decode_failure(lab):
    raw = json.dumps(config()).encode()
    raw = raw[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    doc = error(run(lab, raw))
    assert doc["code"] == 6 and "nests too deeply" in str(doc["msg"])


def test_long_container_id_is_invalid_env(lab):
    store = lab.store()
    try:
        doc = error(run(lab, config(), container_id="c" * 300))
        assert doc["code"] == 4 and "CNI_CONTAINERID" in str(doc["msg"])
        assert store.keys(keys.HANDLES) == []  # refused before IPAM
    finally:
        store.close()


def test_oversized_config_is_refused(lab):
    raw = json.dumps(config(pad="x" * (5 << 20))).encode()
    doc = error(run(lab, raw))
    assert doc["code"] == 6


def test_agent_still_serves(lab):
    outcome = run(lab, config(cniVersion="1.1.0"), command="STATUS")
    assert outcome.ok, outcome


@pytest.mark.parametrize("garbage", [b'L3CNI1' + b'9999:"quote\nnewline\\,', b'L3CNI1x"\n',
                                     b'not a request "at" all\n'])
def test_a_malformed_request_gets_a_json_error_from_the_agent(lab, garbage):
    """The agent's own framing errors are JSON documents too, quotes and newlines or not."""
    from fabric import sockets

    raw = sockets.request("@l3fabric/cni", garbage,
                          netns=netns.path(lab.state.hosts["h1"].netns))
    status, _, body = raw.partition(b"\n")
    assert status == b"1"
    doc = json.loads(body)
    assert doc["code"] == 6 and doc["cniVersion"] == "1.1.0", doc
