"""With a lab up, a command aimed at an etcd (or agent) that is not there names the lab
and `--lab`; `fabricctl lab env` gives what plain commands need to reach its etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fabric.lab.etcd import free_port
from fabric.lab.topology import Lab
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]
FABRICCTL = [sys.executable, "-m", "fabric.cli.main"]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*FABRICCTL, *argv], capture_output=True, text=True, timeout=60,
                            env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab with its underlay and etcd only (no hosts): enough to be "up"."""
    lab = Lab(f"cli{os.getpid() % 100000:05d}h")
    lab.down()
    try:
        lab.create_underlay()
        lab.start_etcd()
        lab.add_pool("default", "10.244.0.0/16")
        yield lab
    finally:
        lab.down()


def test_unreachable_etcd_names_the_lab(lab):
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = run("--etcd-endpoints", nowhere, "ipam", "pool", "list", "-o", "json")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith(f"fabricctl: etcd at {nowhere} is unreachable; lab"), line
    assert f"--lab {lab.name} ipam pool list -o json" in line or "--lab NAME" in line, line
    suggested = run("--lab", lab.name, "ipam", "pool", "list", "-o", "json")
    assert suggested.returncode == 0
    assert [p["name"] for p in json.loads(suggested.stdout)] == ["default"]


def test_unreachable_agent_names_the_lab(lab):
    result = run("node", "status")  # no agent runs in this machine's own namespace
    assert result.returncode == 2
    assert "; lab" in result.stderr and "--host" in result.stderr and lab.name in \
        result.stderr, result.stderr


def test_lab_env_is_a_line_for_the_shell(lab):
    table = run("lab", "env", "--name", lab.name)
    assert table.stdout == f"export FABRIC_ETCD_ENDPOINTS={lab.etcd_local_endpoint}\n"
    doc = run("lab", "env", "--name", lab.name, "-o", "json").stdout
    assert doc.endswith("}\n")
    assert json.loads(doc) == {"FABRIC_ETCD_ENDPOINTS": lab.etcd_local_endpoint}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_ETCD")}
    shell = f'eval "$({" ".join(FABRICCTL)} lab env --name {lab.name})"; ' \
            f'{" ".join(FABRICCTL)} -o json ipam pool list'
    after_eval = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                                timeout=60, env=env)
    assert after_eval.returncode == 0, after_eval.stderr
    assert json.loads(after_eval.stdout)[0]["cidr"] == "10.244.0.0/16"


def test_a_lab_without_a_host_is_asked_for_one(lab):
    result = run("--lab", lab.name, "node", "status")
    assert result.returncode == 2
    assert f"which host of lab {lab.name}? add --host NAME" in result.stderr, result.stderr
