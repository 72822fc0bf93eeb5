"""Network namespaces: create, delete, list, and run code inside one.

Namespaces are the named kind (`/run/netns/NAME`) so `ip netns exec` and people can
find them. `entered()` switches only the calling thread into a namespace, which is
how a netlink socket is opened inside one without a child process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterable, Iterator

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    pass


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the calling thread (os.setns exists only from Python 3.12)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(name: str) -> str:
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")
    return path(name)


def remove(name: str) -> None:
    """Delete a namespace; missing is fine (cleanup paths call this blindly)."""
    if exists(name):
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def remove_many(found: Iterable[str]) -> None:
    """Delete many namespaces with one `ip -batch` (one process, not one per name)."""
    batch = "".join(f"netns del {name}\n" for name in found if exists(name))
    if batch:
        subprocess.run(["ip", "-force", "-batch", "-"], input=batch, text=True, check=False,
                       capture_output=True)


def names(prefix: str = "") -> list[str]:
    if not os.path.isdir(NETNS_DIR):
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def pids(name: str) -> list[int]:
    """PIDs of processes whose network namespace is `name`."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def run(name: str, *argv: str, check: bool = True, timeout: float | None = 60,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace and capture its output."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], check=check, text=True,
                          capture_output=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


@contextlib.contextmanager
def entered(netns_path: str) -> Iterator[None]:
    """Run the body with the calling thread inside another network namespace.

    setns() affects only the calling thread; we always switch back, even on error.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path, os.O_RDONLY)
    except OSError as exc:
        os.close(own)
        raise NetnsError(f"cannot open network namespace {netns_path}: {exc.strerror}") from exc
    try:
        setns(target)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(target)
        os.close(own)


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(argv)}: {result.stderr.strip()}")
