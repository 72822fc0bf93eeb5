"""A real container runtime: podman with its CNI backend on an l3fabric network.

podman runs inside a lab host's network namespace (nsenter --net only: `ip netns exec`
would remount /sys and hide the cgroup mounts runc needs), with its own storage in
the lab directory, and execs our installed plugin like any CNI plugin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from cni.install import install
from fabric.kernel import netns
from ipam.allocator import Ipam
from tests.conftest import needs_root, running_lab

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]
BUSYBOX = "/bin/busybox"
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def rootfs_tar(target: Path) -> Path:
    """A one-binary image: busybox-static with the applets the test uses."""
    root = target / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ip", "ping", "sleep", "cat"):
        os.symlink("busybox", root / "bin" / applet)
    tar = target / "rootfs.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(root, arcname=".")
    return tar


@pytest.fixture
def podman(tmp_path):
    for tool in ("podman", "runc", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (./run test installs it)")
    if not os.path.exists(BUSYBOX):
        pytest.fail("busybox-static is not installed (./run test installs it)")
    with running_lab(pool="10.244.0.0/24", families=(4, 6), pool6="fd00:244::/64") as lab:
        for host in ("h1", "h2"):
            lab.add_host(host)
        for host in ("h1", "h2"):
            lab.wait_agent(host)
        base = lab.dir / "podman"
        install(str(base / "bin"), str(base / "net.d"), network="l3podman", families=(4, 6))
        conf = base / "containers.conf"
        conf.write_text(
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{base}/bin", "/usr/lib/cni"]\n'
            f'network_config_dir = "{base}/net.d"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'runtime = "runc"\n')
        argv = ["nsenter", f"--net={netns.path(lab.state.hosts['h1'].netns)}", "podman",
                "--root", str(base / "storage"), "--runroot", str(base / "run")]
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}

        def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            result = subprocess.run([*argv, *args], env=env, capture_output=True, text=True,
                                    timeout=180)
            if check:
                assert result.returncode == 0, (args, result.stdout, result.stderr)
            return result

        run("import", str(rootfs_tar(tmp_path)), "localhost/l3box:1")
        try:
            yield lab, run
        finally:
            run("rm", "--all", "--force", "--time", "0", check=False)
            run("system", "reset", "--force", check=False)


def test_podman_containers_ping_and_rm_releases(podman):
    lab, run = podman
    store = lab.store()
    try:
        ids = []
        for name in ("one", "two"):
            started = run("run", "-d", "--name", name, "--network", "l3podman", *LIMITS,
                          "localhost/l3box:1", "sleep", "300")
            ids.append(started.stdout.strip())
        address = run("inspect", "-f", "{{.NetworkSettings.Networks.l3podman.IPAddress}}",
                      "two").stdout.strip()
        assert address.startswith("10.244.0.")
        ping = run("exec", "one", "ping", "-c", "2", "-W", "2", address)
        assert "2 packets received" in ping.stdout
        held = {h.handle for h in Ipam(store).handles("h1")}
        assert {f"{i}.eth0" for i in ids} <= held
        run("rm", "--force", "--time", "0", "one", "two")
        held = {h.handle for h in Ipam(store).handles("h1")}
        assert not held & {f"{i}.eth0" for i in ids}
    finally:
        store.close()


def test_a_dual_stack_container_reaches_another_host_over_ipv6(podman):
    lab, run = podman
    other = lab.add_workload("h2")  # through the lab's own CNI call, on the other host
    target = next(ip for ip in other.ips if ":" in ip)
    run("run", "-d", "--name", "six", "--network", "l3podman", *LIMITS, "localhost/l3box:1",
        "sleep", "300")
    mine = run("inspect", "-f", "{{.NetworkSettings.Networks.l3podman.GlobalIPv6Address}}",
               "six").stdout.strip()
    assert mine.startswith("fd00:244:"), mine
    ping = run("exec", "six", "ping", "-c", "2", "-W", "2", target)
    assert "2 packets received" in ping.stdout, ping.stdout
    assert lab.ping(other.netns, mine, count=2)  # and back, from the other host
