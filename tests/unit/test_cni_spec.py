"""CNI request parsing, result documents and the shim's wire format (pure)."""

from __future__ import annotations

import json

import pytest

from cni import shim
from cni.netconf import parse_request
from cni.spec import CniError, IpConfig, Result, RouteConfig

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=Web_1"}
CONF = {"cniVersion": "1.0.0", "name": "net", "type": "l3fabric"}


def request(env=None, conf=None, plugin="l3fabric"):
    return parse_request({**ENV, **(env or {})},
                         json.dumps({**CONF, **(conf or {})}).encode(), plugin)


def test_a_good_request():
    req = request(conf={"mtu": 1400, "ipam": {"type": "l3fabric-ipam", "pools": ["p"],
                                                "families": [4, 6]}})
    assert req.handle == "abc.eth0" and req.conf.mtu == 1400
    assert req.conf.pools == ("p",) and req.conf.families == (4, 6)
    assert req.workload_name is None  # "web_1" is not a DNS name
    assert request(env={"CNI_ARGS": "NAME=web-1"}).workload_name == "web-1"
    assert request(env={"CNI_ARGS": ""}, conf={"runtimeConfig": {"name": "Cache"}}
                   ).workload_name == "cache"


@pytest.mark.parametrize("env, conf, code, text", [
    ({"CNI_COMMAND": ""}, {}, 4, "CNI_COMMAND"),
    ({"CNI_COMMAND": "FROB"}, {}, 4, "not a CNI verb"),
    ({"CNI_NETNS": ""}, {}, 4, "CNI_NETNS"),
    ({"CNI_NETNS": "relative"}, {}, 4, "absolute"),
    ({"CNI_CONTAINERID": "a/b"}, {}, 4, "CNI_CONTAINERID"),
    ({"CNI_IFNAME": "x" * 16}, {}, 4, "CNI_IFNAME"),
    ({"CNI_ARGS": "=x"}, {}, 4, "CNI_ARGS"),
    ({}, {"cniVersion": "0.2.0"}, 1, "not supported"),
    ({"CNI_COMMAND": "CHECK"}, {"cniVersion": "0.3.1"}, 1, "CHECK needs cniVersion 0.4.0"),
    ({}, {"name": "bad name!"}, 7, "network name"),
    ({}, {"mtu": "9000"}, 7, "mtu"),
    ({}, {"ipam": {"type": "dhcp"}}, 7, "ipam type 'dhcp'"),
    ({}, {"ipam": {"families": [5]}}, 7, "families"),
    ({}, {"ipam": {"pools": "default"}}, 7, "pools"),
])
def test_bad_requests_name_the_problem(env, conf, code, text):
    with pytest.raises(CniError, match=text) as info:
        request(env, conf)
    assert info.value.code == code


def test_undecodable_config():
    with pytest.raises(CniError) as info:
        parse_request(ENV, b"{", "l3fabric")
    assert info.value.code == 6


def test_result_document_per_version():
    result = Result(ips=[IpConfig("10.0.0.5/32", "169.254.1.1", 1)],
                    routes=[RouteConfig("0.0.0.0/0", "169.254.1.1")])
    assert result.document("0.4.0")["ips"][0]["version"] == "4"
    assert "version" not in result.document("1.1.0")["ips"][0]
    again = Result.parse(result.document("0.3.1"))
    assert again.ips == result.ips and again.routes == result.routes


def test_shim_wire_format_round_trips():
    values = [b"l3fabric", b"ADD", b"id", b"/run/netns/x", b"eth0", b"", b"/opt", b'{"a":1}']
    assert shim.decode_request(shim.encode_request(values)) == dict(
        zip(shim.FIELDS, values, strict=True))
    with pytest.raises(ValueError):
        shim.decode_request(b"L3CNI1" + b"5:ab,")
    assert shim._version_of(b'{"cniVersion": "0.4.0", "name": "x"}') == b"0.4.0"
    assert shim._version_of(b"garbage") == b"1.1.0"
    assert shim.socket_address("@l3fabric/cni") == "\0l3fabric/cni"


def test_ipv6_needs_an_mtu_of_at_least_1280():
    from cni.netconf import parse_conf

    def conf(mtu, families):
        return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "l3fabric", "mtu": mtu,
                           "ipam": {"type": "l3fabric-ipam", "families": families}}).encode()

    assert parse_conf(conf(1000, [4]), "ADD", "l3fabric").mtu == 1000
    with pytest.raises(CniError, match="below IPv6's minimum of 1280") as refused:
        parse_conf(conf(1000, [4, 6]), "ADD", "l3fabric")
    assert refused.value.code == 7
