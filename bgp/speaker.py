"""The ExaBGP adapter: runs one ExaBGP process and talks to it over its API.

One thread does all of it, around one selector: ExaBGP's API connection (ExaBGP, run
by `bgp.exabgp_run`, connects back to our socket; an unwrapped one runs `bgp.relay`,
which does), ExaBGP's log output, the process itself (a pidfd: readable when it
exits), and a wake-up socket for requests from the agent's owner loop (`configure`,
`send`).

Only our ExaBGP may be the API: a connection from any other process (checked by the
kernel's peer credentials: ExaBGP's pid, or its child's for the relay) is closed at
once, and never replaces the real one. ExaBGP is restarted (SIGTERM: peers keep our
routes, graceful restart) when it cannot go on working: its API connection is gone
(it never reconnects by itself), it refused a reload (ExaBGP 5.0.15 is left refusing
every later one, even of a valid file), or it stopped answering (`bgp.watchdog`;
SIGKILL then, a stopped process ignores SIGTERM). Nothing here blocks on ExaBGP: what we send
is buffered and written when the connection can take it, so ExaBGP, blocked writing
updates to us, can never wait on us while we wait on it.

What it reports (to `report`, the owner loop's inbox): the process started, its API
connected, it exited (it is started again after a back-off; the agent treats its
sessions as gracefully restarting); each API event parsed by `bgp.api`; the outcome
of each reload. Reloads go through `bgp.reload.ReloadGate` (why: see there).

ExaBGP is started with PR_SET_PDEATHSIG=SIGKILL, so if the agent itself is killed
ExaBGP dies with it: it never outlives the agent unnoticed, and because it dies
without a NOTIFICATION, peers that do graceful restart keep our routes meanwhile.
Commands sent while the API is not connected wait for the next connection, except
across a restart: a new ExaBGP starts from the configuration file, which already
holds everything, and the owner loop re-sends the rest when sessions come up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgp import api, relay
from bgp.reload import ReloadGate
from bgp.watchdog import PROBE, ApiWatchdog
from fabric import logs
from fabric.processes import is_running, stop
from fabric.sockets import address, peer_credentials

PR_SET_PDEATHSIG = 1
RESTART_BACKOFF = (0.5, 10.0)  # first and longest delay before starting ExaBGP again
TERM_GRACE = 5.0  # seconds after SIGTERM before SIGKILL
MAX_LINE = 16 << 20  # an API line longer than this is not ExaBGP's: drop the connection


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Started:
    generation: int
    pid: int


@dataclass(frozen=True)
class Connected:
    generation: int


@dataclass(frozen=True)
class Exited:
    generation: int
    code: int | None


@dataclass(frozen=True)
class Restarting:
    """ExaBGP is being stopped to be started again, and why."""

    generation: int
    reason: str


@dataclass(frozen=True)
class Event:
    generation: int
    event: api.Event


@dataclass(frozen=True)
class Reloaded:
    ok: bool
    line: str


Report = Callable[[object], None]


@dataclass(frozen=True)
class _Configure:
    config: str
    reload: bool


@dataclass(frozen=True)
class _Send:
    commands: tuple[str, ...]


@dataclass(frozen=True)
class _Flush:
    done: Future[bool] = field(compare=False)


class Speaker:
    def __init__(self, exabgp: Sequence[str], run_dir: Path, env: dict[str, str],
                 relay_socket: str, report: Report) -> None:
        self.exabgp = list(exabgp)  # the command that runs ExaBGP, before its arguments
        self.run_dir = run_dir
        self.env = env
        self.relay_socket = relay_socket
        self.report = report
        self.config_path = run_dir / "exabgp.conf"
        self.log_path = run_dir / "exabgp.log"
        self.pid_path = run_dir / "exabgp.pid"  # written by us, not by ExaBGP
        self.log = logs.get("bgp.speaker")
        # Everything below belongs to the speaker thread once it runs.
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._generation = 0
        self._conn: socket.socket | None = None
        self._inbuf = b""
        self._refused, self._refused_logged = 0, -60.0  # API connections not ours
        self._outbuf = bytearray()
        self._waiting: list[bytes] = []  # commands for the next connection
        self._flushes: list[Future[bool]] = []  # resolved once all before them is answered
        self._log_fd = -1
        self._logbuf = b""
        self._logfile: Any = None
        self._started_at = 0.0
        self._gate = ReloadGate()
        self._watchdog = ApiWatchdog()
        self._kill_at: float | None = None  # SIGTERM sent; SIGKILL then if still there
        self._respawn_at: float | None = None
        self._backoff = RESTART_BACKOFF[0]
        self._config = ""
        # Requests from other threads: appended under the lock, taken by the thread.
        self._lock = threading.Lock()
        self._requests: list[_Configure | _Send | _Flush] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def relay_command(self) -> list[str]:
        return relay.command(self.relay_socket)

    # -- requests (any thread) ---------------------------------------------------------
    def configure(self, config: str, reload: bool) -> None:
        """Write the configuration; reload ExaBGP when `reload` (see bgp.reload)."""
        self._request(_Configure(config, reload))

    def send(self, commands: Iterable[str]) -> None:
        self._request(_Send(tuple(commands)))

    def flush(self, done: Future[bool]) -> None:
        """Resolve `done` (True) once every command asked for before it was written to
        ExaBGP and answered: for a stop that must get its last commands out. The
        speaker's thread decides, from its own state; False if it stops first."""
        self._request(_Flush(done))

    def _request(self, request: _Configure | _Send | _Flush) -> None:
        with self._lock:
            self._requests.append(request)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, config: str) -> threading.Thread:
        """Listen for the relay, write the configuration, start ExaBGP and the thread."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._kill_leftover()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(address(self.relay_socket))
        self._listener.listen(4)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._logfile = open(self.log_path, "ab")  # noqa: SIM115 - lives with the thread
        self._config = config
        self._write_config(config)
        self._spawn()
        self._thread = threading.Thread(target=self._run, name="bgp-speaker", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop ExaBGP (SIGTERM), and the thread.

        ExaBGP closes its sessions without a NOTIFICATION when graceful restart was
        negotiated (as it is with every fabric peer; ExaBGP does the same for an API
        `teardown`): peers keep our routes, marked stale, for our restart time, and a
        restarted agent confirms them. A node that leaves for good is removed from etcd
        (`fabricctl node rm`); its peers then drop the session and its routes at once.
        """
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=timeout + 5)
        process = self._process
        if process is not None:
            stop(process, timeout)
        for sock in (self._listener, self._conn, self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if self._pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
        if self._logfile is not None:
            self._logfile.close()
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            watchdog = self._watchdog.deadline() if self._conn is not None else None
            deadlines = [d for d in (self._gate.deadline(), self._respawn_at, self._kill_at,
                                     watchdog) if d is not None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
            for key, mask in self._selector.select(min(timeout, 1.0)):
                try:
                    self._ready(key, mask)
                except Exception:  # a bug must not end the thread (and so the agent)
                    self.log.exception("speaker event failed", source=key.data)
            now = time.monotonic()
            if self._gate.poll(now):
                self.log.info("reload not confirmed by ExaBGP; asking again")
                self._write(api.RELOAD)
            if self._conn is not None and self._kill_at is None:
                if self._watchdog.hung(now):
                    self._restart("exabgp stopped answering its API for "
                                  f"{now - self._watchdog.last_answer:.0f}s", hard=True)
                elif self._watchdog.probe_due(now):
                    self._write(PROBE)
                    self._watchdog.probed(now)
            if self._kill_at is not None and now >= self._kill_at:
                self._kill_at = None
                self._signal(signal.SIGKILL)
            if self._respawn_at is not None and now >= self._respawn_at and \
                    not self._stopping.is_set():
                self._respawn_at = None
                self._write_config(self._config)
                self._spawn()
            self._settle_flushes()
        for done in self._flushes:
            done.set_result(False)
        self._stop_process()

    def _settle_flushes(self) -> None:
        if self._flushes and not self._outbuf and not self._waiting and \
                self._conn is not None and self._watchdog.owed == 0:
            for done in self._flushes:
                done.set_result(True)
            self._flushes.clear()

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        """One ready descriptor. Events of one select() round can be stale: the process
        exit handled first closes the API connection and the log pipe whose own events
        come next in the same round; those are skipped."""
        what = key.data
        if what == "wake":
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
            self._take_requests()
        elif what == "listener":
            self._accept()
        elif what == "conn":
            if key.fileobj is not self._conn:
                return
            if mask & selectors.EVENT_READ:
                self._read_api()
            if mask & selectors.EVENT_WRITE and self._conn is not None:
                self._flush()
        elif what == "log" and key.fd == self._log_fd:
            self._drain_log()
        elif what == "exit" and key.fd == self._pidfd:
            self._exited()

    def _take_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for request in requests:
            if isinstance(request, _Configure):
                if request.config != self._config:
                    self._config = request.config
                    self._write_config(request.config)
                if request.reload and self._gate.request(time.monotonic()):
                    self._write(api.RELOAD)
            elif isinstance(request, _Flush):
                self._flushes.append(request.done)
            else:
                for command in request.commands:
                    self._write(command)

    # -- the process -------------------------------------------------------------------
    def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        try:
            self._process = subprocess.Popen(
                [*self.exabgp, "server", str(self.config_path)],
                env={**os.environ, **self.env}, stdin=subprocess.DEVNULL, stdout=write_end,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, cwd=self.run_dir)
        finally:
            os.close(write_end)
        self._generation += 1
        self._gate.spawned()
        self._waiting.clear()  # a new process starts from the file; see the docstring
        os.set_blocking(read_end, False)
        self._close_log()
        self._log_fd = read_end
        self._selector.register(read_end, selectors.EVENT_READ, "log")
        self._started_at = time.monotonic()
        self._pidfd = os.pidfd_open(self._process.pid)
        self._selector.register(self._pidfd, selectors.EVENT_READ, "exit")
        self.pid_path.write_text(f"{self._process.pid}\n")
        self.log.info("exabgp started", pid=self._process.pid, generation=self._generation)
        self.report(Started(self._generation, self._process.pid))

    def _exited(self) -> None:
        process = self._process
        assert process is not None
        code = process.wait()
        self._kill_at = None
        self._selector.unregister(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._drain_log()
        self._close_log()  # its API process may hold the pipe a little longer
        self._drop_connection()
        if self._stopping.is_set():
            return
        # Back off while it keeps dying young; a long-lived one starts over quickly.
        if time.monotonic() - self._started_at > 30:
            self._backoff = RESTART_BACKOFF[0]
        self.log.error("exabgp exited; restarting", code=code, log=str(self.log_path),
                       delay=self._backoff)
        self.report(Exited(self._generation, code))
        self._respawn_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RESTART_BACKOFF[1])

    def _stop_process(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            stop(process)
        self._drain_log()

    def _restart(self, reason: str, hard: bool = False) -> None:
        """Stop ExaBGP so that it is started again (the exit handler does that)."""
        if self._process is None or self._process.poll() is not None or self._stopping.is_set():
            return
        self.log.error("restarting exabgp", reason=reason, pid=self._process.pid)
        self.report(Restarting(self._generation, reason))
        self._drop_connection()
        if hard:
            self._signal(signal.SIGKILL)
        else:
            self._signal(signal.SIGTERM)
            self._kill_at = time.monotonic() + TERM_GRACE

    def _signal(self, sig: int) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)

    def _kill_leftover(self) -> None:
        """An ExaBGP of ours still running from an earlier agent: stop it by its PID."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if str(self.config_path).encode() not in cmdline or not is_running(pid):
            return
        self.log.warning("stopping exabgp left by an earlier agent", pid=pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not is_running(pid):
                return
            time.sleep(0.05)

    # -- the configuration -------------------------------------------------------------
    def _write_config(self, config: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        os.replace(tmp, self.config_path)

    # -- ExaBGP's log: kept in a file, watched for reload outcomes ---------------------
    def _drain_log(self) -> None:
        while self._log_fd >= 0:
            try:
                chunk = os.read(self._log_fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self._close_log()
                break
            self._logfile.write(chunk)
            *lines, self._logbuf = (self._logbuf + chunk).split(b"\n")
            for line in lines:
                self._log_line(line.decode(errors="replace"))
        self._logfile.flush()

    def _close_log(self) -> None:
        if self._log_fd >= 0:
            self._selector.unregister(self._log_fd)
            os.close(self._log_fd)
            self._log_fd = -1
            self._logbuf = b""

    def _log_line(self, line: str) -> None:
        outcome, again = self._gate.log_line(line, time.monotonic())
        if outcome is not None:
            self.report(Reloaded(outcome, line.strip()))
            if not outcome:
                self.log.error("exabgp refused the new configuration", line=line.strip(),
                               config=str(self.config_path))
                self._restart("exabgp refused a reload (it would refuse every later one); "
                              "a new process reads the file")
        if again:
            self._write(api.RELOAD)

    # -- the API connection ------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        pid, uid, _ = peer_credentials(conn)
        if not self._ours(pid):
            # Logged once a minute at most, with a count: a local process connecting
            # in a loop must not fill the log.
            self._refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= 60:
                self.log.warning("refused an api connection that is not our exabgp's",
                                 pid=pid, uid=uid, refused_since_last=self._refused)
                self._refused, self._refused_logged = 0, now
            conn.close()
            return
        self._drop_connection()
        conn.setblocking(False)
        self._conn = conn
        self._inbuf = b""
        self._selector.register(conn, selectors.EVENT_READ, "conn")
        self.log.info("exabgp api connected", generation=self._generation)
        self.report(Connected(self._generation))
        now = time.monotonic()
        self._watchdog.connected(now)
        waiting, self._waiting = self._waiting, []
        if self._gate.api_connected(now):
            self._write(api.RELOAD)
        for line in waiting:
            self._outbuf += line
        self._watchdog.sent(len(waiting), now)
        self._flush()

    def _ours(self, pid: int) -> bool:
        """`pid` is our ExaBGP, or its child (the relay, where ExaBGP is not wrapped)."""
        process = self._process
        if process is None or process.poll() is not None or pid <= 0:
            return False
        if pid == process.pid:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return int(stat.rpartition(")")[2].split()[1]) == process.pid

    def _lost_connection(self, why: str) -> None:
        """The API connection ended while ExaBGP runs: it will never come back by itself."""
        self._drop_connection()
        self._restart(f"exabgp's api connection {why}")

    def _drop_connection(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._conn)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._conn = None
        self._outbuf.clear()
        self._gate.api_lost()

    def _write(self, command: str) -> None:
        line = command.encode() + b"\n"
        if self._conn is None:
            self._waiting.append(line)
            return
        self._outbuf += line
        self._watchdog.sent(1, time.monotonic())
        self._flush()

    def _flush(self) -> None:
        conn = self._conn
        assert conn is not None
        while self._outbuf:
            try:
                sent = conn.send(self._outbuf[:1 << 20])
            except BlockingIOError:
                break
            except OSError:
                self._lost_connection("failed")
                return
            del self._outbuf[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbuf else 0)
        self._selector.modify(conn, events, "conn")

    def _read_api(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            data = conn.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost_connection("closed")
            return
        *lines, self._inbuf = (self._inbuf + data).split(b"\n")
        if len(self._inbuf) > MAX_LINE:
            self._lost_connection(f"sent a line longer than {MAX_LINE} bytes")
            return
        generation, now = self._generation, time.monotonic()
        for line in lines:
            for event in api.parse_line(line):
                if isinstance(event, api.Ack):
                    self._watchdog.answered(now)
                    if event.ok:
                        continue  # one per command: only refusals are worth a message
                self.report(Event(generation, event))
