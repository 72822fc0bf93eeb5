"""etcd over TLS with client certificates: the same settings for every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.lab.etcd import EtcdServer
from fabric.settings import EtcdSettings, SettingsError, parse_endpoints
from fabric.store.datastore import Datastore
from fabric.store.errors import Unavailable


def openssl(*argv: str, cwd: Path) -> None:
    subprocess.run(["openssl", *argv], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    where = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=l3fabric test CA", cwd=where)
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=where)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                "san.cnf", cwd=where)
    return where


@pytest.fixture(scope="module")
def tls_etcd(pki, tmp_path_factory):
    server = EtcdServer.start(tmp_path_factory.mktemp("etcd-tls"), name="l3t-tls-etcd",
                              tls=(str(pki / "server.crt"), str(pki / "server.key"),
                                   str(pki / "ca.crt")))
    yield server
    server.stop()


def test_datastore_over_tls(pki, tls_etcd):
    endpoint = f"https://127.0.0.1:{tls_etcd.port}"
    settings = EtcdSettings(endpoints=parse_endpoints(endpoint), ca_cert=str(pki / "ca.crt"),
                            cert=str(pki / "client.crt"), key=str(pki / "client.key"))
    store = Datastore.connect(settings)
    try:
        store.put("/l3fabric/v1/tls-probe", {"ok": True})
        assert store.get("/l3fabric/v1/tls-probe").value == {"ok": True}
    finally:
        store.close()
    # Without a client certificate the server refuses us: a clear error, not a hang.
    anonymous = Datastore.connect(EtcdSettings(endpoints=parse_endpoints(endpoint),
                                               ca_cert=str(pki / "ca.crt"), timeout=3))
    try:
        with pytest.raises(Unavailable):
            anonymous.get("/l3fabric/v1/tls-probe")
    finally:
        anonymous.close()


def test_fabricctl_takes_tls_settings_from_the_environment(pki, tls_etcd):
    env = {**os.environ, "FABRIC_ETCD_ENDPOINTS": f"https://127.0.0.1:{tls_etcd.port}",
           "FABRIC_ETCD_CA": str(pki / "ca.crt"), "FABRIC_ETCD_CERT": str(pki / "client.crt"),
           "FABRIC_ETCD_KEY": str(pki / "client.key")}
    ctl = [sys.executable, "-m", "fabric.cli.main"]
    added = subprocess.run([*ctl, "ipam", "pool", "add", "tls", "10.250.0.0/24"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    listed = subprocess.run([*ctl, "ipam", "pool", "list"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "10.250.0.0/24" in listed.stdout
    missing = subprocess.run([*ctl, "ipam", "pool", "list"],
                             env={**env, "FABRIC_ETCD_CA": ""}, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("fabricctl: etcd endpoints use https:// but no CA was "
                                      "given (--etcd-ca)")


def test_tls_settings_are_checked_before_connecting(pki):
    with pytest.raises(SettingsError, match="--etcd-cert and --etcd-key must be given"):
        EtcdSettings(endpoints=parse_endpoints("https://127.0.0.1:1"),
                     ca_cert=str(pki / "ca.crt"), cert=str(pki / "client.crt"))
    with pytest.raises(SettingsError, match="no such file"):
        EtcdSettings(endpoints=parse_endpoints("https://127.0.0.1:1"), ca_cert="/nope")
