"""Start and stop a real etcd-server process (tests and the lab both use this).

etcd is started with a throw-away data dir, on loopback or inside a network
namespace, and stopped by PID: nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fabric.processes import stop

ETCD_BINARY_CANDIDATES = ("/usr/bin/etcd", "/usr/local/bin/etcd")
READY_MARKER = "ready to serve client requests"
UNIX_PORT = 2379


class EtcdError(RuntimeError):
    pass


def etcd_binary() -> str:
    found = shutil.which("etcd") or next(
        (p for p in ETCD_BINARY_CANDIDATES if os.path.exists(p)), None)
    if not found:
        raise EtcdError("etcd is not installed (Debian package etcd-server)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EtcdServer:
    host: str
    port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    log_offset: int = 0  # where this run's lines start in the (appended) log

    @property
    def endpoint(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def unix_endpoint(self) -> str:
        """etcd also listens on a unix socket in its work dir: reachable from every
        network namespace (it is a file), which is how tools outside a lab reach it."""
        return f"unix://{self.data_dir.parent}/etcd:{UNIX_PORT}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, workdir: Path, *, host: str = "127.0.0.1", port: int | None = None,
              peer_port: int | None = None, netns: str | None = None,
              name: str = "l3fabric", timeout: float = 20.0,
              tls: tuple[str, str, str] | None = None, cluster: str | None = None,
              wait: bool = True) -> EtcdServer:
        """`tls` = (server certificate, its key, CA): clients must then present a
        certificate from that CA (https only, no unix socket). `cluster` is the whole
        `--initial-cluster` of a cluster this member belongs to; its members must all be
        started (`wait=False`) before any can be ready (`wait_ready`): etcd serves only
        once a quorum has elected a leader."""
        workdir.mkdir(parents=True, exist_ok=True)
        url_host = _url_host(host)
        data_dir = workdir / "etcd-data"
        log_path = workdir / "etcd.log"
        port = port or free_port()
        peer_port = peer_port or free_port()
        if tls:
            clients = f"https://{url_host}:{port}"
            security = ["--cert-file", tls[0], "--key-file", tls[1], "--client-cert-auth",
                        "--trusted-ca-file", tls[2]]
        else:
            clients = f"http://{url_host}:{port},unix://etcd:{UNIX_PORT}"
            security = []
            remove_stale_socket(workdir / f"etcd:{UNIX_PORT}")
        argv = [
            etcd_binary(), "--name", name, "--data-dir", str(data_dir), *security,
            "--listen-client-urls", clients,
            "--advertise-client-urls", clients.split(",")[0],
            "--listen-peer-urls", f"http://{url_host}:{peer_port}",
            "--initial-advertise-peer-urls", f"http://{url_host}:{peer_port}",
            "--initial-cluster", cluster or f"{name}=http://{url_host}:{peer_port}",
            "--snapshot-count", "100000",
        ]
        if cluster:
            argv += ["--initial-cluster-token", "l3fabric"]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        with open(log_path, "ab") as log:
            offset = log.tell()
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       cwd=workdir)
        server = cls(host, port, peer_port, data_dir, log_path, process, offset)
        if wait:
            server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EtcdError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            if READY_MARKER in self._log_since_start():
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdError(f"etcd not ready after {timeout:.0f}s; see {self.log_path}")

    def _log_since_start(self) -> str:
        """This run's part of the log: after a restart in the same directory, the
        previous run's "ready" line must not pass for this one's."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        stop(self.process, timeout)


def remove_stale_socket(path: Path, grace: float = 5.0) -> None:
    """Remove etcd's unix socket file if no etcd is listening on it any more.

    etcd killed with SIGKILL leaves the file behind, and the next etcd started in the
    same directory then fails with "bind: address already in use". Only this exact
    path in our own work directory is touched, and only when it is a socket that
    refuses connections. A socket that still accepts gets `grace` seconds: a killed
    etcd's main thread is reported dead (a zombie) while its other threads still hold
    the listener for a moment. One that keeps accepting is a live etcd: an error.
    """
    deadline = time.monotonic() + grace
    while True:
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                return
        except FileNotFoundError:
            return
        if not _accepts(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        if time.monotonic() > deadline:
            raise EtcdError(f"an etcd is already serving on {path}; stop it first")
        time.sleep(0.1)


def _accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def _url_host(host: str) -> str:
    """An address as a URL's host: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host
