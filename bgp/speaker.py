"""The ExaBGP adapter: runs one ExaBGP process and talks to it over the API.

The agent owns ExaBGP's life: it starts it with a rendered configuration, restarts it
when it dies (and tells the agent, which treats the sessions as gracefully
restarting), reloads it with SIGUSR1 when peers or routes change, and stops it on
shutdown. ExaBGP is started with PR_SET_PDEATHSIG=SIGKILL, so if the agent itself is
killed ExaBGP dies with it: it never outlives the agent unnoticed, and because it dies
without a NOTIFICATION, peers that do graceful restart keep our routes meanwhile.

The API process ExaBGP runs is `bgp.relay`, which connects back to the socket served
here; events are parsed by `bgp.api` and handed to `on_event` on the reader thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bgp import api
from fabric import logs
from fabric.processes import stop
from fabric.sockets import address

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Speaker:
    def __init__(self, exabgp: str, run_dir: Path, env: dict[str, str], relay_socket: str,
                 on_event: Callable[[api.Event], None],
                 on_exit: Callable[[int | None], None]) -> None:
        self.exabgp = exabgp
        self.run_dir = run_dir
        self.env = env
        self.relay_socket = relay_socket
        self.on_event = on_event
        self.on_exit = on_exit
        self.config_path = run_dir / "exabgp.conf"
        self.log_path = run_dir / "exabgp.log"
        self.pid_path = run_dir / "exabgp.pid"
        self.log = logs.get("bgp.speaker")
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.errors = 0
        self._config = ""
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def relay_command(self) -> list[str]:
        return [sys.executable, "-m", "bgp.relay", self.relay_socket]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, config: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._kill_leftover()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(address(self.relay_socket))
        self._listener.listen(4)
        self._config = config
        self._write_config(config)
        self._spawn()
        for target, name in ((self._accept, "bgp-api"), (self._supervise, "bgp-supervisor")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: ExaBGP closes every session with a Cease notification, then exits."""
        self._stop.set()
        if self.process is not None:
            stop(self.process, timeout)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [self.exabgp, "server", str(self.config_path)],
                env={**os.environ, **self.env}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, cwd=self.run_dir)
        finally:
            log.close()
        self.started_at = time.time()
        self.log.info("exabgp started", pid=self.process.pid)

    def _kill_leftover(self) -> None:
        """An ExaBGP of ours still running from an earlier agent: stop it by its PID."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if str(self.config_path).encode() in cmdline:
            self.log.warning("stopping exabgp left by an earlier agent", pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)

    def _supervise(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            process = self.process
            if process is None:
                return
            code = process.wait()
            if self._stop.is_set():
                return
            self.restarts += 1
            self.log.error("exabgp exited; restarting", code=code, restarts=self.restarts,
                           log=str(self.log_path))
            with contextlib.suppress(Exception):
                self.on_exit(code)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0) if time.time() - self.started_at < 30 else 0.5
            self._write_config(self._config)
            self._spawn()

    # -- configuration -----------------------------------------------------------------
    def _write_config(self, config: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        os.replace(tmp, self.config_path)

    def reconfigure(self, config: str) -> None:
        """New peers or routes: rewrite the file and reload. A reload announces what
        was added but withdraws nothing; the caller withdraws through `send`."""
        if config != self._config:
            self._config = config
            self._write_config(config)
            if self.running:
                assert self.process is not None
                self.process.send_signal(signal.SIGUSR1)

    def send(self, command: str) -> bool:
        conn = self._conn
        if conn is None:
            return False
        with self._send_lock:
            try:
                conn.sendall(command.encode() + b"\n")
                return True
            except OSError:
                return False

    # -- API events --------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            old, self._conn = self._conn, conn
            if old is not None:
                with contextlib.suppress(OSError):
                    old.close()
            self._read(conn)
            if self._conn is conn:
                self._conn = None

    def _read(self, conn: socket.socket) -> None:
        pending = b""
        while True:
            try:
                data = conn.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            pending += data
            lines = pending.split(b"\n")
            pending = lines.pop()
            for line in lines:
                for event in api.parse_line(line):
                    if isinstance(event, api.Ack) and not event.ok:
                        self.errors += 1
                    try:
                        self.on_event(event)
                    except Exception:
                        self.log.exception("event handler failed", event_type=type(event).__name__)
