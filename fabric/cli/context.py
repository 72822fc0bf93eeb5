"""What every command handler gets: parsed args, output format, lazy connections.

`--host NAME` points a command at a lab host: the agent is reached through that
host's network namespace and etcd through the lab's socket. Without it, the agent is
the one of this machine's network namespace and etcd comes from the usual settings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric import sockets
from fabric.cli.output import CliError
from fabric.kernel import netns
from fabric.lab.topology import Lab, all_labs
from fabric.settings import EtcdSettings, etcd_settings, parse_endpoints
from fabric.sockets import CONTROL_SOCKET
from fabric.store.datastore import Datastore

# Options that pick etcd: meaningless with --lab, which brings its own etcd.
ETCD_OPTIONS = ("--etcd-endpoints", "--etcd-ca", "--etcd-cert", "--etcd-key")


def program() -> str:
    """How the user can run fabricctl again: as invoked (relative to here if shorter)."""
    invoked = sys.argv[0]
    if os.path.basename(invoked) != "fabricctl" or not os.path.isabs(invoked):
        return "fabricctl"
    relative = os.path.relpath(invoked)
    return relative if not relative.startswith("..") else invoked


def with_lab(argv: Sequence[str], lab: str, host: str | None = None) -> str:
    """The command line `argv` again, aimed at a lab: `fabricctl --lab L [--host H] ...`
    without the etcd options, which would otherwise win over the lab's etcd."""
    kept: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ETCD_OPTIONS:
            skip = True
        elif not word.startswith(tuple(f"{o}=" for o in ETCD_OPTIONS)):
            kept.append(word)
    target = ["--lab", lab] + (["--host", host] if host else [])
    return shlex.join([program(), *target, *kept])


@dataclass
class Context:
    args: argparse.Namespace
    _store: Datastore | None = field(default=None, init=False)
    _lab: Lab | None = field(default=None, init=False)

    @property
    def json(self) -> bool:
        return getattr(self.args, "output", "table") == "json"

    # -- lab ---------------------------------------------------------------------------
    @property
    def lab(self) -> Lab | None:
        """The lab named by --lab, or the only lab there is when --host is given."""
        if self._lab is None:
            name = getattr(self.args, "lab", None)
            if not name and getattr(self.args, "host", None):
                labs = all_labs()
                if len(labs) != 1:
                    raise CliError("--host needs --lab NAME: " + (
                        f"labs running: {', '.join(labs)}" if labs else "no lab is running"))
                name = labs[0]
            if name:
                lab = Lab(name)
                if not lab.state_path.exists():
                    raise CliError(f"no lab named {name} (fabricctl lab up --name {name})")
                self._lab = lab
        return self._lab

    def host_netns(self) -> str | None:
        host = getattr(self.args, "host", None)
        if not host:
            if getattr(self.args, "lab", None) and self.lab is not None:
                # A lab's agents live in its hosts' namespaces, not in this one.
                raise CliError(f"which host of lab {self.lab.name}? add --host NAME (hosts: "
                               f"{', '.join(sorted(self.lab.state.hosts)) or 'none yet'})")
            return None
        lab = self.lab
        assert lab is not None
        if host in lab.state.hosts:
            return netns.path(lab.state.hosts[host].netns)
        raise CliError(f"lab {lab.name} has no host {host} "
                       f"(hosts: {', '.join(sorted(lab.state.hosts))})")

    # -- connections -------------------------------------------------------------------
    def settings(self) -> EtcdSettings:
        settings = etcd_settings(self.args)
        explicit = getattr(self.args, "etcd_endpoints", None)
        if self.lab is not None and not explicit:
            return EtcdSettings(endpoints=parse_endpoints(self.lab.etcd_local_endpoint))
        return settings

    @property
    def store(self) -> Datastore:
        if self._store is None:
            self._store = Datastore.connect(self.settings())
        return self._store

    def agent(self, method: str, **params: Any) -> Any:
        return sockets.call(CONTROL_SOCKET, method, netns=self.host_netns(), **params)

    def lab_hint(self, argv: Sequence[str], agent: bool = False) -> str:
        """"; lab L is up: try ..." when etcd (or the local agent) could not be reached
        and the command aimed at no lab, though one is up: the usual cause is a
        forgotten --lab. Empty otherwise."""
        if getattr(self.args, "lab", None) or getattr(self.args, "host", None):
            return ""
        labs = all_labs()
        if not labs:
            return ""
        if len(labs) > 1:
            return f"; labs {', '.join(labs)} are up: try " + with_lab(
                argv, "NAME", "HOST" if agent else None)
        host = None
        if agent:
            hosts = sorted(Lab(labs[0]).state.hosts)
            host = hosts[0] if hosts else "HOST"
        return f"; lab {labs[0]} is up: try {with_lab(argv, labs[0], host)}"

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name: str) -> Any:  # convenience: ctx.force == ctx.args.force
        return getattr(self.args, name)
