"""`fabricctl bgp ...` (against a real etcd) and `fabricctl cni install`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]


@pytest.fixture
def ctl(etcd_server, store):
    def run(*argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*FABRICCTL, "--etcd-endpoints", etcd_server.endpoint, *argv],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expect, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result
    return run


def test_bgp_config_and_peers(ctl):
    assert json.loads(ctl("-o", "json", "bgp", "config").stdout) == {"asn": 64512,
                                                                     "node_mesh": True}
    assert ctl("bgp", "config", "--as", "65010", "--no-mesh").stdout.strip() == \
        "AS 65010, node mesh off"
    ctl("bgp", "peer", "add", "tor1", "10.0.1.254", "--as", "65101", "--node-selector",
        "rack=r1", "--password", "s3cret", "--max-prefixes", "500")
    ctl("bgp", "peer", "add", "special", "10.0.9.1", "--as", "65200", "--node", "n1")
    peers = json.loads(ctl("-o", "json", "bgp", "peer", "list").stdout)
    assert [(p["name"], p["node"], p["node_selector"], p["password"]) for p in peers] == [
        ("special", "n1", {}, None), ("tor1", None, {"rack": "r1"}, "***")]
    table = ctl("bgp", "peer", "list").stdout
    assert "rack=r1" in table and "s3cret" not in table
    assert "exists" in ctl("bgp", "peer", "add", "tor1", "10.0.1.1", "--as", "1",
                           expect=2).stderr
    assert "not an IP address" in ctl("bgp", "peer", "add", "x", "nope", "--as", "1",
                                      expect=2).stderr
    assert "password" in ctl("bgp", "peer", "add", "y", "10.0.0.1", "--as", "1",
                             "--password", "has space", expect=2).stderr
    ctl("bgp", "peer", "rm", "special")
    assert "no peer named special" in ctl("bgp", "peer", "rm", "special", expect=2).stderr


def test_agent_commands_without_an_agent_are_exit_2(ctl):
    # No agent runs in the test's own network namespace (lab agents live in theirs).
    result = ctl("node", "status", expect=2)
    assert result.stderr.startswith("fabricctl: the l3fabric agent is not reachable")


def test_cni_install(tmp_path):
    result = subprocess.run([*FABRICCTL, "cni", "install", "--bin-dir", str(tmp_path / "bin"),
                             "--conf-dir", str(tmp_path / "net.d"), "--network", "prod",
                             "--mtu", "1450", "--pool", "default"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    conflist = json.loads((tmp_path / "net.d" / "10-prod.conflist").read_text())
    assert conflist["name"] == "prod"
    assert conflist["plugins"][0] == {"type": "l3fabric", "mtu": 1450, "ipam": {
        "type": "l3fabric-ipam", "families": [4], "pools": ["default"]}}
    for plugin in ("l3fabric", "l3fabric-ipam"):
        version = subprocess.run([str(tmp_path / "bin" / plugin)],
                                 env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                                 text=True, timeout=30)
        assert json.loads(version.stdout)["supportedVersions"][-1] == "1.1.0"
    bad = subprocess.run([*FABRICCTL, "cni", "install", "--bin-dir", str(tmp_path),
                          "--mtu", "9"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--mtu 9" in bad.stderr


@pytest.mark.parametrize("network", ["bad name", "../escape", "prod\n"])
def test_cni_install_refuses_a_network_name_the_plugin_would_refuse(tmp_path, network):
    result = subprocess.run([*FABRICCTL, "cni", "install", "--bin-dir", str(tmp_path / "bin"),
                             "--conf-dir", str(tmp_path / "net.d"), "--network", network],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("fabricctl: the plugin would refuse this configuration: "
                                    f"network name {network!r} is invalid")
    assert not (tmp_path / "net.d").exists() and not (tmp_path / "bin").exists()
