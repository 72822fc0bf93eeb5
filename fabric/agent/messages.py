"""Everything that reaches the owner loop, and everything it asks the adapters to do.

Inputs are facts (a mirror's new contents, an ExaBGP event, what the kernel writer
did) or requests with a reply (a CNI ADD's routes, a control query). Outputs are jobs
for the adapters, each run on the adapter's own thread, which reports back with
another input. Both are plain immutable records: the loop's tests build them by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from bgp import api
from fabric.agent.workloads import HostLink
from fabric.kernel.routes import Applied, EventsLost, Failure, Resynced, Route, RouteEvent
from fabric.model.nodes import Node
from fabric.model.prefix import Prefix
from fabric.policy.compiler import HostRules, PolicyReport

# -- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The complete contents of one mirrored etcd prefix (key -> record), and the keys
    whose value could not be read (key -> why; their last readable value is in
    `records`, if there was one)."""

    name: str
    records: Mapping[str, Mapping[str, Any]]
    unreadable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BgpEvent:
    generation: int  # which ExaBGP process (restarts count up)
    event: api.Event


@dataclass(frozen=True)
class SpeakerStatus:
    """ExaBGP's process: started, its API connected, being restarted (and why), exited."""

    generation: int
    state: str  # "started", "connected", "restarting", "exited"
    pid: int | None = None
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class ReloadStatus:
    """ExaBGP confirmed (or refused) a configuration reload."""

    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Attach:
    """A CNI ADD wired a workload: enforce its network policy, route its addresses out
    of `index`, then reply. `policy_reply` completes once its rules are in the kernel,
    which is before its route is (both go through the kernel writer's one queue)."""

    handle: str
    ips: tuple[str, ...]
    host_ifname: str
    index: int
    reply: Future[list[Failure]] = field(compare=False)
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    name: str = ""
    policy_reply: Future[PolicyReport] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Detach:
    """A CNI DEL or GC unwired a workload: drop its routes, then reply."""

    handle: str
    ips: tuple[str, ...]
    host_ifname: str | None
    reply: Future[list[Failure]] = field(compare=False)


@dataclass(frozen=True)
class LinksListed:
    links: tuple[HostLink, ...]


@dataclass(frozen=True)
class JobDone:
    """An etcd or system job finished (or failed: `error`)."""

    kind: str
    error: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Query:
    """Read the loop's state (control socket, metrics): `read(state)` on the loop."""

    read: Callable[[Any], Any]
    reply: Future[Any] = field(compare=False)


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Leave:
    """The machine is going down: withdraw our own routes and announce none again.
    `reply` is resolved by the speaker once ExaBGP has taken the withdrawals."""

    reply: Future[bool] = field(compare=False)


@dataclass(frozen=True)
class PolicyDone:
    """The kernel writer applied (or checked) the policy table."""

    report: PolicyReport
    check: bool = False


Input = (Snapshot | BgpEvent | SpeakerStatus | ReloadStatus | Applied | Resynced | RouteEvent
         | EventsLost | Attach | Detach | LinksListed | JobDone | PolicyDone | Query | Stop)

# -- jobs (outputs) ----------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyRoutes:
    """Kernel writer: install `replace`, remove `delete`, in this order among jobs."""

    replace: tuple[Route, ...]
    delete: tuple[Prefix, ...]
    reply: Future[list[Failure]] | None = field(default=None, compare=False)
    # A policy apply this batch waits on (an ADD's): if it failed, nothing is installed.
    guard: Future[PolicyReport] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Resync:
    """Kernel writer: dump our routes, repair every difference from `desired`."""

    desired: Mapping[Prefix, Route]
    keep: frozenset[Prefix]


@dataclass(frozen=True)
class Configure:
    """Speaker: write this configuration; reload ExaBGP when `reload`."""

    config: str
    reload: bool


@dataclass(frozen=True)
class Send:
    """Speaker: API commands, in order (queued while ExaBGP's API is not connected)."""

    commands: tuple[str, ...]


@dataclass(frozen=True)
class Flush:
    """Speaker: resolve `done` once every command sent before it was written to ExaBGP
    and answered."""

    done: Future[bool] = field(compare=False)


@dataclass(frozen=True)
class RegisterNode:
    """etcd: write our node record (create it, or rewrite it if it is ours)."""

    node: Node


@dataclass(frozen=True)
class RefreshLiveness:
    """etcd: keep our liveness key's lease alive (re-create it if it expired)."""


@dataclass(frozen=True)
class CollectGarbage:
    """etcd: one IPAM GC round for this node."""


@dataclass(frozen=True)
class ListLinks:
    """kernel: list our host-side links."""


@dataclass(frozen=True)
class ResolveOrphan:
    """etcd + kernel: an unexplained host link (see fabric.agent.workloads)."""

    link: HostLink


@dataclass(frozen=True)
class CheckHost:
    """kernel: forwarding on, our NAT rules and hook in place (repaired if not)."""


@dataclass(frozen=True)
class ReleaseGone:
    """etcd + kernel: a workload whose host link has been gone for the grace period:
    release its addresses and registration (unless its link is back)."""

    handle: str
    host_ifname: str


@dataclass(frozen=True)
class RestoreBlock:
    """etcd: our block's record is gone while our workloads have addresses in it."""

    cidr: str
    pool: str


@dataclass(frozen=True)
class ApplyNat:
    nat_pools: tuple[str, ...]
    all_pools: tuple[str, ...]


@dataclass(frozen=True)
class ApplyPolicy:
    """Kernel writer (in its queue, among the route batches): make the nftables table
    hold `rules` (None: nothing to change, only reply in order); `full` replaces it
    whole."""

    rules: HostRules | None
    full: bool = False
    reply: Future[PolicyReport] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CheckPolicy:
    """Kernel writer: compare the table with `rules`, replace it if it differs."""

    rules: HostRules


Job = (ApplyRoutes | Resync | Configure | Send | Flush | RegisterNode | RefreshLiveness
       | CollectGarbage | ListLinks | CheckHost | ResolveOrphan | ReleaseGone | RestoreBlock
       | ApplyNat | ApplyPolicy | CheckPolicy)
