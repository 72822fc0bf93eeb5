"""What every command handler gets: parsed args, output format, lazy connections."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from fabric.datastore import Datastore
from fabric.settings import etcd_settings


@dataclass
class Context:
    args: argparse.Namespace
    _store: Datastore | None = field(default=None, init=False)

    @property
    def json(self) -> bool:
        return getattr(self.args, "output", "table") == "json"

    @property
    def store(self) -> Datastore:
        if self._store is None:
            self._store = Datastore.connect(etcd_settings(self.args))
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name: str) -> Any:  # convenience: ctx.force == ctx.args.force
        return getattr(self.args, name)
