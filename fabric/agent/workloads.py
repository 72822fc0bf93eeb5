"""Routes to this node's workloads, and what to do about host links nobody knows. Pure.

A workload's /32 (/128) goes out of its host-side veth. Who the workloads are comes
from two inputs: the CNI handler (an ADD just wired it, a DEL just unwired it) and
etcd's registrations (after a restart, the only source). Where they are comes from the
host links, listed from the kernel on a timer and reported by each ADD.

The CNI input wins over etcd until etcd catches up: a DEL's handle is ignored in the
registrations until its record is gone (the mirror may lag behind the DEL). And a
workload's route stays until its DEL, or until its link is gone, even if its
registration vanishes meanwhile (deleted by mistake, or an etcd restore from an older
backup): the container lives as long as its link does, whatever etcd says.

A registration whose host link is gone for `grace` seconds (listing after listing) is
a container that is gone: its namespace went with its veth (a host rebooted, a
runtime that never sent DEL). Its addresses are released (`gone`), or a rebooted host
would keep one address per container it ran, for ever.

A host link of ours (name prefix `l3f`) that no registration explains is suspect; seen
so on two listings in a row (with the same index: not a link re-made meanwhile) it is
an orphan, and the agent resolves it: the IPAM handle it belongs to still exists -> its
registration is restored; no handle and the link is down (a DEL that did not finish)
-> it is removed; no handle but the link is up -> it is kept and reported, because a
container may be behind it and deleting it would cut that container off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fabric.kernel.routes import Route, workload
from fabric.model.nodes import Workload
from fabric.model.prefix import Prefix


@dataclass(frozen=True)
class HostLink:
    name: str
    index: int
    up: bool


@dataclass(frozen=True)
class Known:
    """A workload as far as routing cares: its addresses and its host-side link."""

    ips: tuple[str, ...]
    host_ifname: str


@dataclass
class Workloads:
    registered: dict[str, Known] = field(default_factory=dict)  # handle -> (from etcd)
    attached: dict[str, Known] = field(default_factory=dict)  # handle -> (from CNI ADD)
    retained: dict[str, Known] = field(default_factory=dict)  # registration vanished
    detached: set[str] = field(default_factory=set)  # DEL'd; etcd may not know yet
    links: dict[str, HostLink] = field(default_factory=dict)  # name -> (kernel)
    suspects: dict[str, int] = field(default_factory=dict)  # name -> index seen
    unresolved: dict[str, str] = field(default_factory=dict)  # link name -> why it stays
    linkless: dict[str, float] = field(default_factory=dict)  # handle -> since (no link)
    releasing: set[str] = field(default_factory=set)  # handles handed to `gone` already

    # -- inputs ------------------------------------------------------------------------
    def on_registrations(self, records: Iterable[Workload]) -> None:
        registered = {w.handle: Known(w.ips, w.host_ifname) for w in records
                      if w.host_ifname}
        # Vanished without a DEL of ours: keep routing it. Computed before `detached`
        # forgets the DELs etcd has caught up with, which are exactly the vanished ones.
        for handle in set(self.registered) - set(registered) - self.detached:
            self.retained[handle] = self.registered[handle]
        self.detached &= set(registered)  # etcd caught up with those DELs
        for handle in set(registered) & set(self.retained):
            del self.retained[handle]
        self.registered = registered
        self.releasing &= set(registered)

    def attach(self, handle: str, ips: Iterable[str], host_ifname: str, index: int) -> None:
        self.attached[handle] = Known(tuple(ips), host_ifname)
        self.detached.discard(handle)
        self.links[host_ifname] = HostLink(host_ifname, index, True)
        self.suspects.pop(host_ifname, None)
        self.unresolved.pop(host_ifname, None)

    def detach(self, handle: str, host_ifname: str | None) -> None:
        self.attached.pop(handle, None)
        self.retained.pop(handle, None)
        self.detached.add(handle)
        if host_ifname:
            self.links.pop(host_ifname, None)

    def on_links(self, links: Iterable[HostLink], now: float = 0.0) -> list[HostLink]:
        """A fresh listing of our host links; returns the orphans to resolve now."""
        self.links = {link.name: link for link in links}
        self.linkless = {h: self.linkless.get(h, now) for h, k in self.registered.items()
                         if k.host_ifname not in self.links and h not in self.detached}
        self.retained = {h: k for h, k in self.retained.items() if k.host_ifname in self.links}
        explained = {k.host_ifname for h, k in self.registered.items()
                     if h not in self.detached}
        orphans = []
        suspects = {}
        for link in self.links.values():
            if link.name in explained:
                continue
            if self.suspects.get(link.name) == link.index and link.name not in self.unresolved:
                orphans.append(link)
            suspects[link.name] = link.index
        self.suspects = suspects
        self.unresolved = {n: why for n, why in self.unresolved.items() if n in suspects}
        return orphans

    def gone(self, now: float, grace: float) -> list[tuple[str, str]]:
        """(handle, host link) of registrations without their link for `grace`, each
        once: to be released (see the module docstring)."""
        found = sorted((h, self.registered[h].host_ifname) for h, since in self.linkless.items()
                       if now - since >= grace and h not in self.releasing)
        self.releasing.update(h for h, _ in found)
        return found

    def release_failed(self, handle: str) -> None:
        """The release did not happen (etcd down, the link came back): ask again later."""
        self.releasing.discard(handle)
        self.linkless.pop(handle, None)

    def resolved(self, name: str, outcome: str) -> None:
        """What the resolver did with an orphan; "kept" ones are reported, not retried."""
        if outcome == "kept":
            self.unresolved[name] = "up, and no IPAM handle names it: a container may use it"
        else:
            self.suspects.pop(name, None)

    # -- outputs -----------------------------------------------------------------------
    def known(self) -> dict[str, Known]:
        """Every workload we route to (registered, retained, or just attached)."""
        merged = {h: k for h, k in self.registered.items() if h not in self.detached}
        merged.update(self.retained)
        merged.update(self.attached)
        return merged

    def routes(self) -> dict[Prefix, Route]:
        routes = {}
        for known in self.known().values():
            link = self.links.get(known.host_ifname)
            if link is None:
                continue
            for address in known.ips:
                prefix = Prefix.parse(address)
                routes[prefix] = workload(prefix, link.index)
        return routes


def names(records: Iterable[Workload]) -> Mapping[str, tuple[str, ...]]:
    """Workload name -> addresses, for DNS (every node's workloads)."""
    out: dict[str, list[str]] = {}
    for record in records:
        if record.name:
            out.setdefault(record.name, []).extend(record.ips)
    return {name: tuple(ips) for name, ips in out.items()}
