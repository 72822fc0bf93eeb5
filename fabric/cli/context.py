"""What every command handler gets: parsed args, output format, lazy connections.

`--host NAME` points a command at a lab host: the agent is reached through that
host's network namespace and etcd through the lab's socket. Without it, the agent is
the one of this machine's network namespace and etcd comes from the usual settings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from fabric import sockets
from fabric.cli.output import CliError
from fabric.kernel import netns
from fabric.lab.topology import Lab, all_labs
from fabric.settings import EtcdSettings, etcd_settings, parse_endpoints
from fabric.sockets import CONTROL_SOCKET
from fabric.store.datastore import Datastore


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

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name: str) -> Any:  # convenience: ctx.force == ctx.args.force
        return getattr(self.args, name)
