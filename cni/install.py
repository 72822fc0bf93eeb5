"""`fabricctl cni install`: put the plugin executables and a conflist in place.

The executables are copies of `cni/shim.py` with a shebang naming this interpreter's
real path with `-SI` (no site-packages, no environment: a few milliseconds of
start-up instead of tens), so they keep working whatever PATH the runtime has.

The conflist is checked by the plugin's own parser (`cni.netconf.parse_conf`) before
anything is written, so install never leaves a configuration the plugin would refuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cni.netconf import IPAM_PLUGIN, PLUGIN, parse_conf
from cni.spec import CniError
from fabric.settings import SettingsError

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
SHIM_SOURCE = Path(__file__).with_name("shim.py")


class InstallError(SettingsError):
    """An install option the plugin would refuse; nothing was written.

    A SettingsError, so fabricctl reports it as one line and exit status 2, like any
    other value it cannot use.
    """


def shim_text(python: str | None = None) -> str:
    interpreter = os.path.realpath(python or sys.executable)
    return f"#!{interpreter} -SI\n" + SHIM_SOURCE.read_text()


def conflist(network: str = "l3fabric", *, mtu: int = 1500, pools: Sequence[str] | None = None,
             families: Sequence[int] = (4,), chain: Sequence[dict[str, Any]] = (),
             version: str = "1.0.0") -> dict[str, Any]:
    ipam: dict[str, Any] = {"type": IPAM_PLUGIN, "families": list(families)}
    if pools:
        ipam["pools"] = list(pools)
    return {"cniVersion": version, "name": network,
            "plugins": [{"type": PLUGIN, "mtu": mtu, "ipam": ipam}, *chain]}


def check_conflist(doc: dict[str, Any]) -> None:
    """Raise InstallError unless the plugin accepts our entry of `doc`, exactly as a
    runtime hands it over (the list's cniVersion and name merged into the entry)."""
    entry = {**doc["plugins"][0], "cniVersion": doc["cniVersion"], "name": doc["name"]}
    try:
        parse_conf(json.dumps(entry).encode(), "ADD", PLUGIN)
    except CniError as exc:
        raise InstallError(f"the plugin would refuse this configuration: {exc.msg}") from exc


def install(bin_dir: str = DEFAULT_BIN_DIR, conf_dir: str | None = DEFAULT_CONF_DIR, *,
            network: str = "l3fabric", mtu: int = 1500, pools: Sequence[str] | None = None,
            families: Sequence[int] = (4,), chain: Sequence[dict[str, Any]] = (),
            python: str | None = None) -> list[Path]:
    """Write the executables and (unless `conf_dir` is None) the conflist.

    The network name also names the conflist file, so it is checked before anything
    is written.
    """
    doc = conflist(network, mtu=mtu, pools=pools, families=families, chain=chain)
    check_conflist(doc)
    written = []
    Path(bin_dir).mkdir(parents=True, exist_ok=True)
    text = shim_text(python)
    for name in (PLUGIN, IPAM_PLUGIN):
        written.append(_write(Path(bin_dir) / name, text, 0o755))
    if conf_dir:
        Path(conf_dir).mkdir(parents=True, exist_ok=True)
        written.append(_write(Path(conf_dir) / f"10-{network}.conflist",
                              json.dumps(doc, indent=2) + "\n", 0o644))
    return written


def _write(target: Path, text: str, mode: int) -> Path:
    """Replace `target` at once: a runtime never execs or reads half a file, and
    installs running side by side (lab hosts sharing a directory) never share a
    temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
