"""`fabricctl cni install`: put the plugin executables and a conflist in place.

The executables are copies of `cni/shim.py` with a shebang naming this interpreter's
real path with `-SI` (no site-packages, no environment: a few milliseconds of
start-up instead of tens), so they keep working whatever PATH the runtime has.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cni.netconf import IPAM_PLUGIN, PLUGIN

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
SHIM_SOURCE = Path(__file__).with_name("shim.py")


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


def install(bin_dir: str = DEFAULT_BIN_DIR, conf_dir: str | None = DEFAULT_CONF_DIR, *,
            network: str = "l3fabric", mtu: int = 1500, pools: Sequence[str] | None = None,
            families: Sequence[int] = (4,), chain: Sequence[dict[str, Any]] = (),
            python: str | None = None) -> list[Path]:
    written = []
    Path(bin_dir).mkdir(parents=True, exist_ok=True)
    text = shim_text(python)
    for name in (PLUGIN, IPAM_PLUGIN):
        target = Path(bin_dir) / name
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        written.append(target)
    if conf_dir:
        Path(conf_dir).mkdir(parents=True, exist_ok=True)
        target = Path(conf_dir) / f"10-{network}.conflist"
        target.write_text(json.dumps(conflist(network, mtu=mtu, pools=pools,
                                              families=families, chain=chain), indent=2) + "\n")
        written.append(target)
    return written
