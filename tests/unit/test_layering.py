"""The layers stay apart: pure modules import no client library, nothing imports the agent.

Every module of the four packages is classified here as pure (decisions and records,
tested without root) or as an adapter (etcd, netlink, processes, sockets). A new
module fails `test_every_module_is_classified` until it is put in one list, so the
rule cannot be forgotten.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fabric", "bgp", "ipam", "cni")
CLIENT_LIBRARIES = ("etcd3", "grpc", "pyroute2")

PURE = {
    "fabric", "fabric.model", "fabric.model.blocks", "fabric.model.checks", "fabric.model.handles",
    "fabric.model.nodes", "fabric.model.peers", "fabric.model.policy", "fabric.model.pools",
    "fabric.model.prefix",
    "fabric.store", "fabric.store.errors", "fabric.store.keys",
    "fabric.kernel", "fabric.kernel.routes", "fabric.settings",
    "fabric.agent", "fabric.agent.clock", "fabric.agent.messages", "fabric.agent.state",
    "fabric.agent.desired", "fabric.agent.sessions", "fabric.agent.exports",
    "fabric.agent.routing", "fabric.agent.workloads", "fabric.agent.policy",
    "fabric.policy", "fabric.policy.compiler",
    "bgp", "bgp.api", "bgp.config", "bgp.peers", "bgp.policy", "bgp.rib", "bgp.reload",
    "bgp.watchdog",
    "ipam", "ipam.blocks", "ipam.check",
    "cni", "cni.spec", "cni.netconf", "cni.shim",
}
ADAPTERS = {
    "fabric.logs", "fabric.sockets", "fabric.processes",
    "fabric.store.datastore", "fabric.store.watch", "fabric.store.registry",
    "fabric.kernel.links", "fabric.kernel.nat", "fabric.kernel.netlink",
    "fabric.kernel.netns", "fabric.kernel.features", "fabric.kernel.writer",
    "fabric.kernel.nftables", "fabric.store.policies",
    "fabric.agent.config", "fabric.agent.main", "fabric.agent.service", "fabric.agent.loop",
    "fabric.agent.registration", "fabric.agent.workers", "fabric.agent.dns",
    "fabric.agent.metrics",
    "fabric.cli", "fabric.cli.bgp", "fabric.cli.cni", "fabric.cli.context", "fabric.cli.ipam",
    "fabric.cli.lab", "fabric.cli.main", "fabric.cli.node", "fabric.cli.output",
    "fabric.cli.policy", "fabric.lab.server",
    "fabric.lab", "fabric.lab.etcd", "fabric.lab.peers", "fabric.lab.topology",
    "bgp.speaker", "bgp.relay", "bgp.exabgp_run",
    "ipam.allocator", "ipam.gc",
    "cni.handler", "cni.install", "cni.invoke",
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def test_every_module_is_classified():
    names = set(modules())
    assert names - PURE - ADAPTERS == set(), "classify new modules as PURE or ADAPTERS"
    assert (PURE | ADAPTERS) - names == set(), "a classified module no longer exists"
    assert set() == PURE & ADAPTERS


def test_pure_modules_import_no_client_library():
    pure = sorted(PURE & set(modules()))
    script = (
        "import importlib, sys\n"
        f"for name in {pure!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules\n"
        f"                     if m.split('.')[0] in {CLIENT_LIBRARIES!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "", f"pure modules pulled in: {result.stdout}"


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_nothing_outside_the_agent_imports_it():
    offenders = {}
    for name, path in modules().items():
        if name == "fabric.agent" or name.startswith("fabric.agent."):
            continue
        bad = {i for i in imported(path) if i == "fabric.agent" or i.startswith("fabric.agent.")}
        if bad:
            offenders[name] = sorted(bad)
    assert offenders == {}


def test_the_check_sees_a_violation(tmp_path):
    """The import check above is not vacuous: it finds an agent import where one is."""
    probe = tmp_path / "probe.py"
    probe.write_text("from fabric.agent.service import Agent\nimport fabric.agent.loop\n")
    assert imported(probe) >= {"fabric.agent.service", "fabric.agent.loop"}
