"""The Vagrant provisioning script, tested without VMs.

`vagrant/provision.sh` provisions two lab hosts (network namespaces on one underlay,
with the lab's etcd), each with an install root of its own (DESTDIR, as a chroot
would be): it installs l3fabric from this tree into a fresh virtualenv, writes the
config, the CNI plugin and the systemd units. The agents are then started the way
the unit says (its ExecStart, as a non-root user with only the unit's capabilities),
the script's own wait step checks the sessions, and containers attached through the
installed plugin ping each other.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cni import invoke
from fabric.agent.config import load
from fabric.agent.main import build_parser
from fabric.kernel import netns
from fabric.processes import kill_pid
from tests.conftest import needs_root, running_lab

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "vagrant" / "provision.sh"
AGENT_UID = 64973  # an unused uid: no user account is created on the test machine


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(path)
    return parser


def provision(lab, host: str, dest: Path, *args: str, in_host: bool = False, **env: str
              ) -> subprocess.CompletedProcess[str]:
    """Run the script for `host`. Installing runs in this machine's namespace (pip must
    reach the package index; the files go under DESTDIR as if in a chroot); the wait
    step runs inside the host's namespace, where the host's agent is."""
    state = lab.state.hosts[host]
    environment = {
        **os.environ, "DESTDIR": str(dest), "FABRIC_SRC": str(ROOT),
        "FABRIC_NODE_NAME": host, "FABRIC_NODE_ADDRESS": state.address,
        "FABRIC_NODE_ADDRESS6": state.address6, "FABRIC_UNDERLAY_DEV": "eth0",
        "FABRIC_ETCD_ENDPOINTS": lab.etcd_endpoint, "FABRIC_SKIP_APT": "1",
        "FABRIC_SYSTEMD": "0", "FABRIC_WAIT": "0", **env}
    wrapper = ["ip", "netns", "exec", state.netns] if in_host else []
    return subprocess.run([*wrapper, str(SCRIPT), *args], env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def provisioned(tmp_path):
    if not Path("/usr/bin/python3").exists() or shutil.which("setpriv") is None:
        pytest.fail("needs Debian's python3 (with python3-venv) and setpriv")
    with running_lab(pool=None, families=(4, 6)) as lab:
        roots = {}
        for host in ("h1", "h2"):
            lab.add_host(host, start=False)
            # Under the lab's directory: readable by the agent's user, removed with the lab.
            roots[host] = lab.dir / f"root-{host}"
            extra = {"FABRIC_ETCD_MEMBER": "node1"} if host == "h1" else {}
            result = provision(lab, host, roots[host], **extra)
            assert result.returncode == 0, result.stderr
        pids: list[int] = []
        try:
            yield lab, roots, pids
        finally:
            for pid in pids:
                kill_pid(pid)


def test_provisioning_writes_what_a_node_needs_and_it_works(provisioned, tmp_path):
    lab, roots, pids = provisioned
    root = roots["h1"]

    # The agent's config: valid, and what the inputs said.
    config = load(build_parser().parse_args(
        ["--config", str(root / "etc/l3fabric/agent.toml")]), env={})
    assert (config.node_name, config.node_address, config.node_address6) == (
        "h1", lab.state.hosts["h1"].address, lab.state.hosts["h1"].address6)
    assert config.etcd.describe() == lab.etcd_endpoint

    # The units: the agent as a non-root user with a few capabilities, restarted on
    # failure; etcd from its environment file on the etcd member.
    agent_unit = unit(root / "etc/systemd/system/fabric-agent.service")
    service = agent_unit["Service"]
    assert service["ExecStart"] == ("/opt/l3fabric/venv/bin/fabric-agent "
                                    "--config /etc/l3fabric/agent.toml")
    assert service["Restart"] == "on-failure" and service["User"] == "l3fabric"
    caps = service["AmbientCapabilities"].split()
    assert set(caps) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW",
                         "CAP_SYS_ADMIN"}
    assert agent_unit["Install"]["WantedBy"] == "multi-user.target"
    etcd_env = (root / "etc/l3fabric/etcd.env").read_text()
    assert "ETCD_NAME=node1" in etcd_env
    assert f"ETCD_ADVERTISE_CLIENT_URLS=http://{lab.state.hosts['h1'].address}:2379" \
        in etcd_env
    assert (root / "etc/systemd/system/l3fabric-etcd.service").exists()
    underlay6 = unit(root / "etc/systemd/system/l3fabric-underlay6.service")
    assert underlay6["Service"]["ExecStart"] == (
        f"/sbin/ip -6 addr replace {lab.state.hosts['h1'].address6}/64 dev eth0 nodad")
    # ...and again whenever ifupdown brings the interface up (Vagrant flushes it first).
    hook = root / "etc/network/if-up.d/l3fabric-underlay6"
    assert os.access(hook, os.X_OK)
    assert '[ "$IFACE" = "eth0" ] || exit 0' in hook.read_text()
    assert (f"ip -6 addr replace {lab.state.hosts['h1'].address6}/64 dev eth0 nodad"
            in hook.read_text())
    assert not (roots["h2"] / "etc/systemd/system/l3fabric-etcd.service").exists()

    # The CNI plugin, runnable as installed (its interpreter is a real path, not one
    # under DESTDIR), and a conflist podman is pointed at.
    plugin = root / "opt/cni/bin/l3fabric"
    shebang = plugin.read_text().splitlines()[0]
    assert shebang.startswith("#!/") and str(root) not in shebang and shebang.endswith(" -SI")
    conflist = json.loads((root / "etc/cni/net.d/10-l3fabric.conflist").read_text())
    assert conflist["plugins"][0]["type"] == "l3fabric"
    assert 'network_backend = "cni"' in (
        root / "etc/containers/containers.conf.d/l3fabric.conf").read_text()

    # Start each agent exactly as the unit says, as a non-root user with only the
    # unit's capabilities.
    for host, dest in roots.items():
        argv = service["ExecStart"].split()
        argv[0] = str(dest) + argv[0]
        argv[argv.index("--config") + 1] = str(dest) + "/etc/l3fabric/agent.toml"
        run_dir = lab.dir / f"run-{host}"
        run_dir.mkdir()
        os.chown(run_dir, AGENT_UID, AGENT_UID)
        capset = ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
        log = open(tmp_path / f"{host}-agent.log", "wb")  # noqa: SIM115 - the child's
        process = subprocess.Popen(
            ["ip", "netns", "exec", lab.state.hosts[host].netns, "setpriv",
             f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups",
             f"--inh-caps={capset}", f"--ambient-caps={capset}", *argv],
            env={"PATH": os.environ["PATH"], "FABRIC_RUN_DIR": str(run_dir)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        pids.append(process.pid)

    # The script's last step: etcd reachable, the pool made, the sessions Established.
    waited = provision(lab, "h2", roots["h2"], "wait", in_host=True, FABRIC_WAIT="1",
                       FABRIC_EXPECT_PEERS="2", FABRIC_WAIT_TIMEOUT="60")
    assert waited.returncode == 0, waited.stderr + (tmp_path / "h2-agent.log").read_text()
    assert "ready: 2 session(s) Established" in waited.stderr  # one per family
    assert "IP pool 10.244.0.0/16 created" in waited.stderr
    assert "IP pool fd00:244::/64 created" in waited.stderr

    # Containers through the installed plugin, on both hosts, reach each other.
    addresses = {}
    for host, dest in roots.items():
        container = f"{lab.name}-{host}-c"
        netns.create(container)
        outcome = invoke.run(str(dest / "opt/cni/bin/l3fabric"), "ADD",
                             invoke.network_config(conflist), container_id=container,
                             netns=netns.path(container),
                             host_netns=netns.path(lab.state.hosts[host].netns))
        assert outcome.ok, outcome.stdout
        addresses[host] = [ip["address"].split("/")[0] for ip in outcome.document["ips"]]
    assert [":" in a for a in addresses["h1"]] == [False, True]  # dual stack
    for source, target in (("h1", "h2"), ("h2", "h1")):
        for address in addresses[target]:  # each family, across hosts
            assert lab.ping(f"{lab.name}-{source}-c", address, count=3), address
    agents = subprocess.run(["ps", "-o", "uid=", "-p", ",".join(map(str, pids))],
                            capture_output=True, text=True).stdout.split()
    assert set(agents) == {str(AGENT_UID)}


def test_provisioning_refuses_missing_inputs(tmp_path):
    result = subprocess.run([str(SCRIPT)], env={"PATH": os.environ["PATH"]},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "FABRIC_NODE_ADDRESS is required" in result.stderr


def test_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (./run test installs it)")
    for script in ("vagrant/provision.sh", "vagrant/smoke.sh", "vagrant/faults.sh",
                   "vagrant/lib.sh", "vagrant/cluster.sh", "vagrant/box/build.sh", "run",
                   ".ci/run"):
        result = subprocess.run(["shellcheck", str(ROOT / script)], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout


def test_vagrantfile_validates():
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant is not installed (./run test installs it)")
    env = {**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt",
           "VAGRANT_DOTFILE_PATH": "/tmp/l3fabric-vagrant-validate"}
    for extra in ({}, {"FABRIC_ETCD_CLUSTER": "1"}, {"FABRIC_NODES": "5"},
                  {"FABRIC_LIBVIRT_DRIVER": "kvm"}, {"FABRIC_LIBVIRT_DRIVER": "qemu"}):
        result = subprocess.run(["vagrant", "validate"], cwd=ROOT / "vagrant",
                                env={**env, **extra}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (extra, result.stdout, result.stderr)
    bad = subprocess.run(["vagrant", "validate"], cwd=ROOT / "vagrant",
                         env={**env, "FABRIC_ETCD_CLUSTER": "1", "FABRIC_NODES": "2"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "at least 3 nodes" in bad.stderr + bad.stdout
    bad = subprocess.run(["vagrant", "validate"], cwd=ROOT / "vagrant",
                         env={**env, "FABRIC_LIBVIRT_DRIVER": "xen"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "must be kvm or qemu" in bad.stderr + bad.stdout
    shutil.rmtree("/tmp/l3fabric-vagrant-validate", ignore_errors=True)
