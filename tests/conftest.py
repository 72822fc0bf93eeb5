"""Shared fixtures: a real etcd per session, a clean keyspace per test, and network
namespaces with a unique prefix that are always removed."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fabric import logs
from fabric.kernel import netns
from fabric.lab.etcd import EtcdServer
from fabric.lab.topology import Lab
from fabric.settings import EtcdSettings, parse_endpoints
from fabric.store.datastore import Datastore
from fabric.store.keys import ROOT

# Every namespace, link and process name a test makes starts with this, so leftovers
# are attributable and a cleanup can find them.
PREFIX = f"l3t{os.getpid() % 100000:05d}"

# Library code logs through structlog; keep test output to what matters.
logs.configure("console", "warning")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, routes)")


def _ensure_etcd() -> None:
    if shutil.which("etcd") is None:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "etcd-server"],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    _ensure_etcd()
    server = EtcdServer.start(tmp_path_factory.mktemp("etcd"), name=f"{PREFIX}-etcd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_settings(etcd_server: EtcdServer) -> EtcdSettings:
    return EtcdSettings(endpoints=parse_endpoints(etcd_server.endpoint))


@pytest.fixture
def store(etcd_settings: EtcdSettings) -> Iterator[Datastore]:
    ds = Datastore.connect(etcd_settings)
    ds.delete_prefix(ROOT)
    try:
        yield ds
    finally:
        ds.delete_prefix(ROOT)
        ds.close()


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], str]]:
    """make(suffix) -> namespace name; every namespace made is deleted afterwards."""
    made: list[str] = []
    counter = itertools.count()

    def make(suffix: str = "") -> str:
        name = f"{PREFIX}-{next(counter)}{suffix}"
        netns.create(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            for pid in netns.pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            netns.remove(name)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


_lab_counter = itertools.count()


def lab_name() -> str:
    """Unique per test process and call: `l3` + pid digits + a letter."""
    return f"l3{os.getpid() % 100000:05d}{'abcdefghijklmnopqrstuvwxyz'[next(_lab_counter) % 26]}"


@contextlib.contextmanager
def running_lab(pool: str | None = "10.244.0.0/16", block_size: int | None = None,
                families: tuple[int, ...] = (4,), pool6: str | None = None,
                **flags: bool) -> Iterator[Lab]:
    """An underlay with etcd (and optionally IP pools: `pool` for IPv4, `pool6` for
    IPv6, on an underlay of `families`); always torn down."""
    lab = Lab(lab_name())
    lab.down()
    try:
        lab.create_underlay(families=families)
        lab.start_etcd()
        if pool:
            lab.add_pool("default", pool, block_size, **flags)
        if pool6:
            lab.add_pool("default6", pool6)
        yield lab
    finally:
        _keep_logs(lab)
        lab.down()


LOGS = Path(os.environ.get("L3FABRIC_TEST_LOGS", "/tmp/l3fabric-test-logs"))


def _keep_logs(lab: Lab) -> None:
    """The agents' and ExaBGP's logs outlive the lab, for the failure that needs them."""
    target = LOGS / lab.name
    with contextlib.suppress(OSError):
        for log in lab.dir.glob("*/*.log"):
            (target / log.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, target / log.parent.name / log.name)
