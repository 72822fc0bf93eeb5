"""Exec a CNI plugin the way a runtime does: CNI_* environment, config on stdin.

Used by the lab (to attach its workloads), by the tests and by `bench/cni.py` (which
execs our plugin and the reference plugins identically). `host_netns` runs the
plugin inside a host's network namespace, as a runtime on that host would.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    status: int
    stdout: str
    stderr: str

    @property
    def document(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def ok(self) -> bool:
        return self.status == 0


def run(binary: str, command: str, config: dict[str, Any] | bytes, *, container_id: str = "",
        netns: str = "", ifname: str = "eth0", args: str = "", cni_path: str = "",
        host_netns: str | None = None, timeout: float = 60.0,
        extra_env: dict[str, str] | None = None) -> Outcome:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_ARGS": args,
           "CNI_PATH": cni_path or os.path.dirname(binary), "PATH": "/usr/sbin:/usr/bin:/bin"}
    env.update(extra_env or {})
    stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
    # nsenter, not a preexec_fn calling setns: forking a process that runs gRPC threads
    # and then running Python in the child can abort in gRPC's fork handlers.
    argv = ["nsenter", f"--net={host_netns}", binary] if host_netns else [binary]
    result = subprocess.run(argv, input=stdin, env=env, capture_output=True,
                            timeout=timeout, check=False)
    return Outcome(result.returncode, result.stdout.decode(errors="replace"),
                   result.stderr.decode(errors="replace"))


def network_config(conflist: dict[str, Any], index: int = 0,
                   prev_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """One plugin's config from a conflist, as a runtime builds it."""
    plugin = dict(conflist["plugins"][index])
    plugin["cniVersion"] = conflist["cniVersion"]
    plugin["name"] = conflist["name"]
    if prev_result is not None:
        plugin["prevResult"] = prev_result
    return plugin
