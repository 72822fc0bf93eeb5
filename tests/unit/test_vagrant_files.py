"""The Vagrant cluster's scripts, checked without VMs (`./run vagrant` runs them on VMs;
vagrant/README.md has what that showed)."""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": os.environ["PATH"], "PYTHON": sys.executable}


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=60)


def test_provision_lists_every_package_it_installs_for_the_box():
    result = run([str(ROOT / "vagrant/provision.sh"), "packages"])
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split()
    script = (ROOT / "vagrant/provision.sh").read_text()
    array = re.search(r"^PACKAGES=\(([^)]*)\)", script, re.M)
    assert array is not None
    assert set(array.group(1).split()) | {"etcd-server", "etcd-client"} == set(listed)


def box_tree(tmp_path: Path) -> Path:
    """A copy of what the box's hash reads: the builder, provision.sh, pyproject.toml."""
    tree = tmp_path / "tree"
    (tree / "vagrant/box").mkdir(parents=True)
    shutil.copy(ROOT / "vagrant/box/build.sh", tree / "vagrant/box/build.sh")
    shutil.copy(ROOT / "vagrant/provision.sh", tree / "vagrant/provision.sh")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def box_hash(tree: Path, **env: str) -> str:
    result = run([str(tree / "vagrant/box/build.sh"), "--hash"],
                 **{"FABRIC_BOX_MIRROR": "http://mirror.example/debian", **env})
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]{16}\n", result.stdout), result.stdout
    return result.stdout.strip()


def test_the_box_is_rebuilt_when_an_input_changes_and_only_then(tmp_path):
    tree = box_tree(tmp_path)
    first = box_hash(tree)
    assert box_hash(tree) == first  # nothing changed: the cached box is used
    assert box_hash(tree, FABRIC_BOX_MIRROR="http://other.example/debian") != first

    provision = tree / "vagrant/provision.sh"
    provision.write_text(provision.read_text().replace("busybox-static", "busybox-static tcpdump"))
    second = box_hash(tree)
    assert second != first  # a package more for provisioning: a box with it

    pyproject = tree / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"PyYAML>=6",', '"PyYAML>=6", "rich",'))
    third = box_hash(tree)
    assert third not in (first, second)  # a Python dependency more: in the wheelhouse

    builder = tree / "vagrant/box/build.sh"
    builder.write_text(builder.read_text() + "\n# changed\n")
    assert box_hash(tree) not in (first, second, third)


def test_faults_refuses_a_cluster_too_small_for_its_checks():
    result = run([str(ROOT / "vagrant/faults.sh")], FABRIC_NODES="2")
    assert result.returncode == 2
    assert "at least 3 VMs" in result.stderr


def test_run_names_the_vagrant_command():
    result = run([str(ROOT / "run")])
    assert result.returncode == 2
    assert "./run vagrant" in result.stdout and "./run lab" in result.stdout


def cluster(tmp_path: Path, script: str, virsh_answers: bool = False,
            **env: str) -> subprocess.CompletedProcess[str]:
    """cluster.sh's functions alone (sourced), with a stand-in virsh: a libvirtd that
    answers (exit 0) or none (exit 1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    virsh = bin_dir / "virsh"
    virsh.write_text(f"#!/bin/sh\nexit {0 if virsh_answers else 1}\n")
    virsh.chmod(0o755)
    return subprocess.run(
        ["bash", "-c", f'. "{ROOT}/vagrant/cluster.sh"; {script}'],
        env={**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True, text=True, timeout=60)


def qemu_conf(tmp_path: Path, mode: int | None, group: str | None = None,
              virsh_answers: bool = False) -> tuple[str, str]:
    """Run qemu_conf against a copy of a stock qemu.conf and a stand-in /dev/kvm with
    this mode (None: no /dev/kvm); return the file's new lines and the log."""
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "libvirt-qemu"\n#group = "libvirt-qemu"\n')
    kvm = tmp_path / "kvm"
    kvm.unlink(missing_ok=True)
    if mode is not None:
        kvm.write_text("")
        kvm.chmod(mode)
        if group is not None:
            shutil.chown(kvm, group=group)
    result = cluster(tmp_path, "qemu_conf; qemu_conf", virsh_answers,
                     FABRIC_QEMU_CONF=str(conf), FABRIC_KVM_DEV=str(kvm))
    assert result.returncode == 0, result.stderr
    added = conf.read_text().removeprefix('#user = "libvirt-qemu"\n#group = "libvirt-qemu"\n')
    return added, result.stderr


def test_qemu_runs_as_root_only_where_kvm_is_roots_alone_and_libvirtd_is_ours(tmp_path):
    # No udev (this machine): /dev/kvm root's, 0600; no libvirtd yet: set, once.
    added, log = qemu_conf(tmp_path, 0o600)
    assert added.count('user = "root"\ngroup = "root"\n') == 1, added
    # The same, but a libvirtd (not started by us) runs: its configuration is left alone.
    added, log = qemu_conf(tmp_path, 0o600, virsh_answers=True)
    assert added == "" and "not ours" in log
    # No /dev/kvm at all, or one anybody can use: nothing to work around.
    assert qemu_conf(tmp_path, None)[0] == ""
    assert qemu_conf(tmp_path, 0o666)[0] == ""


def test_qemu_conf_is_left_alone_where_udev_gave_kvm_to_its_group(tmp_path):
    try:
        grp.getgrnam("kvm")
    except KeyError:
        pytest.skip("no kvm group here")
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to the kvm group")
    assert qemu_conf(tmp_path, 0o660, group="kvm")[0] == ""
    assert qemu_conf(tmp_path, 0o600, group="kvm")[0] != ""  # group without access


def test_a_copy_of_the_box_cut_short_in_the_pool_is_removed(tmp_path):
    """An upload interrupted by anything but Ctrl-C leaves vagrant-libvirt's copy of the
    box in the pool half written, and it would be every VM's disk from then on."""
    if os.geteuid() != 0:
        pytest.skip("box/build.sh runs as root only")
    cache, pool = tmp_path / "cache", tmp_path / "pool"
    cache.mkdir()
    pool.mkdir()
    env = {"FABRIC_BOX_CACHE": str(cache), "FABRIC_BOX_MIRROR": "http://mirror.example/debian",
           "VAGRANT_HOME": str(tmp_path / "vagrant-home")}
    digest = run([str(ROOT / "vagrant/box/build.sh"), "--hash"], **env).stdout.strip()
    box = cache / f"bookworm64-{digest}.box"
    box.write_text("")  # cached: build.sh builds nothing
    (cache / "box-added").write_text(f"{box}\n")
    image = tmp_path / "vagrant-home/boxes/debian-VAGRANTSLASH-bookworm64/0/libvirt/box.img"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"qcow2" * 1000)
    name = "debian-VAGRANTSLASH-bookworm64_vagrant_box_image_0_{}_box.img"
    (pool / name.format(1)).write_bytes(b"qcow2" * 1000)  # a whole copy
    (pool / name.format(2)).write_bytes(b"qcow2" * 500)   # cut short
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vagrant").write_text('#!/bin/sh\necho "debian/bookworm64 (libvirt, 0)"\n')
    (bin_dir / "virsh").write_text(f"""#!/bin/sh
case "$1" in
  version) exit 0 ;;
  vol-list) echo " Name  Path"; for f in {pool}/*; do echo " ${{f##*/}}  $f"; done ;;
  vol-path) echo "{pool}/$4" ;;
  vol-delete) rm "{pool}/$4" ;;
  *) exit 1 ;;
esac
""")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    result = subprocess.run(
        ["bash", "-c", f'. "{ROOT}/vagrant/cluster.sh"; ensure_box'],
        env={**ENV, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in pool.iterdir()) == [name.format(1)], result.stderr
    assert "not the box" in result.stderr
