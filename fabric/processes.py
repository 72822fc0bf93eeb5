"""Stopping processes we started, by PID, never by name.

`stop` is for a child we still hold a `Popen` of (etcd, ExaBGP); `kill_pid` for a PID
recorded elsewhere (the lab's state file), whose process may no longer be our child.
Both send the signal, wait up to `timeout`, then SIGKILL, and reap what they can.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # a no-op when it died meanwhile
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not is_running(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def kill_pids(pids: Iterable[int], timeout: float = 10.0,
              sig: int = signal.SIGTERM) -> None:
    """`kill_pid` for many at once: signal them all, then wait for them together (a lab
    of 100 hosts stops in seconds, not in 100 times one process's grace)."""
    waiting = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            waiting.add(pid)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    waiting.discard(pid)
                    continue
            if not is_running(pid):
                waiting.discard(pid)
        if waiting:
            time.sleep(0.05)
    for pid in waiting:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in waiting:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(") ")[2]
    return bool(state) and not state.startswith("Z")
