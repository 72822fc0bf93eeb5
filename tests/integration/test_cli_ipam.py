"""`fabricctl ipam ...` as a user runs it: a subprocess against a real etcd."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fabric.model.nodes import Workload
from fabric.store.registry import Registry
from ipam.allocator import Ipam


@pytest.fixture
def ctl(etcd_server, store):
    def run(*argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "fabric.cli.main", "--etcd-endpoints",
             etcd_server.endpoint, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == expect, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result
    return run


def test_pool_lifecycle(ctl, store):
    ctl("ipam", "pool", "add", "default", "10.244.0.0/16", "--nat-outgoing")
    out = ctl("-o", "json", "ipam", "pool", "list").stdout
    assert json.loads(out) == [{"name": "default", "cidr": "10.244.0.0/16", "block_size": 26,
                                "nat_outgoing": True, "disabled": False,
                                "strict_affinity": False}]
    table = ctl("ipam", "pool", "list").stdout
    assert "10.244.0.0/16" in table and "/26" in table
    err = ctl("ipam", "pool", "add", "other", "10.244.1.0/24", expect=2).stderr
    assert err.strip() == "fabricctl: pool 10.244.1.0/24 overlaps pool 'default' (10.244.0.0/16)"
    err = ctl("ipam", "pool", "add", "x", "10.1.0.0/24", "--block-size", "20", expect=2).stderr
    assert "larger than the pool" in err
    err = ctl("ipam", "pool", "add", "x", "not-a-cidr", expect=2).stderr
    assert "not a valid network" in err

    Ipam(store).allocate("c1.eth0", "n1")
    err = ctl("ipam", "pool", "rm", "default", expect=2).stderr
    assert "in use" in err and "--force" in err
    ctl("ipam", "pool", "rm", "default", "--force")
    assert json.loads(ctl("-o", "json", "ipam", "pool", "list").stdout) == []


def test_show_check_release(ctl, store):
    ctl("ipam", "pool", "add", "default", "10.244.0.0/24")
    ipam, registry = Ipam(store), Registry(store)
    kept = ipam.allocate("kept.eth0", "n1").allocations[0].address
    registry.register_workload(Workload("kept.eth0", "n1", "kept", "eth0", "/x", (kept,)))
    leaked = ipam.allocate("leaked.eth0", "n1").allocations[0].address
    store.put("/l3fabric/v1/nodes/n1", {"name": "n1", "address": "192.0.2.1", "asn": 64512})

    show = json.loads(ctl("-o", "json", "ipam", "show", "--blocks").stdout)
    assert show["usage"][0]["used"] == 2
    assert show["usage"][1]["node"] == "n1"
    assert show["blocks"] == [{"cidr": "10.244.0.0/26", "pool": "default",
                               "affinity": "n1", "used": 2}]
    assert "10.244.0.0/26" in ctl("ipam", "show", "--blocks").stdout

    report = json.loads(ctl("-o", "json", "ipam", "check", expect=1).stdout)
    assert [(f["kind"], f["subject"]) for f in report["findings"]] == [("leak", "leaked.eth0")]
    assert "1 problem(s) found" in ctl("ipam", "check", expect=1).stdout

    ctl("ipam", "release", "--leaked")
    assert json.loads(ctl("-o", "json", "ipam", "check").stdout)["ok"] is True
    assert "already free" in ctl("ipam", "release", leaked).stdout
    assert "in use by container kept" in ctl("ipam", "release", kept, expect=2).stderr
    assert "was held by kept.eth0" in ctl("ipam", "release", kept, "--force").stdout
    assert "not inside any IP pool" in ctl("ipam", "release", "192.0.2.9", expect=2).stderr


def test_unreachable_etcd_is_one_line_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "fabric.cli.main", "--etcd-endpoints", "http://127.0.0.1:9",
         "ipam", "pool", "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    line = result.stderr.strip()  # one line; a lab that happens to be up adds a hint
    assert "\n" not in line and line.startswith(
        "fabricctl: etcd at http://127.0.0.1:9 is unreachable"), line


def test_usage_error_exit_2():
    result = subprocess.run([sys.executable, "-m", "fabric.cli.main", "ipam", "bogus"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr
