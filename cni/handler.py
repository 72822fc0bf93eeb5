"""The CNI verbs, run inside the node agent for each request the shim forwards.

ADD, DEL, CHECK, GC and STATUS side by side, as the reference plugins read. The kernel
work is in `fabric.kernel.links`; addresses come from `ipam`; workloads are registered
in etcd so check, GC and DNS can see them; host routes are asked of the agent's owner
loop (`WorkloadRoutes`), which alone writes the kernel's routes.

Requests for one handle (one container interface) run one at a time; requests for
different handles run side by side. A repeated ADD of an attachment that is intact
gets the same result and changes nothing. A failed ADD leaves nothing behind that it
made, and nothing that an earlier ADD of the same handle made: every step that
created something registers its undo, and the undo runs in reverse order before the
error is returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from cni.netconf import IPAM_PLUGIN, Request, parse_request
from cni.shim import FIELDS
from cni.spec import (
    INVALID_ENV,
    IO_FAILURE,
    LATEST,
    NOT_READY,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    CniError,
    Interface,
    IpConfig,
    Result,
    RouteConfig,
    version_document,
)
from fabric import logs
from fabric.kernel import links
from fabric.kernel.routes import Failure
from fabric.model.handles import Exhausted, Handle, HandleElsewhere, IpamError
from fabric.model.nodes import Workload
from fabric.store import keys
from fabric.store.datastore import Entry, get_op, parsed
from fabric.store.errors import DatastoreError, Unavailable
from fabric.store.registry import RegistrationError, Registry
from ipam.allocator import Allocated, AlsoPut, Ipam, KeyPresent

# Plugin-specific error codes (the spec leaves 100 and up to plugins).
NO_ADDRESS = 100
CHECK_FAILED = 101
INTERNAL = 199
# How long detached pairs wait to be deleted together (see CniHandler.delete).
REAP_DELAY = 0.1


@dataclass
class Undo:
    """Steps to take back, newest first, if the operation fails."""

    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def push(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self, log: Any) -> None:
        for what, step in reversed(self.steps):
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                log.error("rollback step failed", step=what, error=str(exc))


class WorkloadRoutes(Protocol):
    """Host routes to workloads, kept by the agent's owner loop (it alone writes routes).

    Each call returns once the kernel has the change, with what the kernel refused."""

    def attach(self, handle: str, ips: Sequence[str], host_ifname: str, index: int,
               namespace: str = "", labels: Mapping[str, str] | None = None,
               name: str = "") -> list[Failure]:
        """Also enforces the workload's network policy, before its route exists."""

    def detach(self, handle: str, ips: Sequence[str],
               host_ifname: str | None) -> list[Failure]: ...

    def missing(self, ips: Sequence[str], index: int | None = None) -> list[str]:
        """Addresses that have no host route (or, with `index`, none out of that
        interface: another container's interface holds the route)."""


class HandleLocks:
    """One lock per handle while anybody uses it: requests for one container interface
    run one after another, requests for different ones never wait for each other. An
    entry lives only while somebody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def held(self, handle: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(handle, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[handle]

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)


class CniHandler:
    def __init__(self, node: str, ipam: Ipam, registry: Registry, routes: WorkloadRoutes,
                 dns: Mapping[str, Any] | None = None) -> None:
        self.node = node
        self.ipam = ipam
        self.registry = registry
        self.routes = routes
        self.dns = dict(dns or {})
        self.log = logs.get("cni", node=node)
        self.locks = HandleLocks()
        self._unwire = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cni-unwire")
        self._reap_lock = threading.Lock()
        self._reap_due = False
        # Handles this agent added, as it wrote them: DEL releases them in one round
        # trip. Hints only (every use is compared); an entry is touched only under its
        # handle's lock.
        self._known: dict[str, Entry] = {}

    # -- entry point -------------------------------------------------------------------
    def handle(self, fields: Mapping[str, bytes],
               netns_fd: int | None = None) -> tuple[int, bytes]:
        """(exit status, stdout) for one forwarded request."""
        env = {k: fields[k].decode(errors="replace") for k in FIELDS[1:-1]}
        plugin = fields["plugin"].decode(errors="replace") or "l3fabric"
        version = LATEST
        try:
            request = parse_request(env, fields["stdin"], plugin)
            if netns_fd is not None:
                request = dataclasses.replace(request, netns_access=f"/proc/self/fd/{netns_fd}")
            version = request.conf.version
            verbs = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                     "GC": self.gc, "STATUS": self.status,
                     "VERSION": lambda _: version_document()}
            per_handle = request.command in ("ADD", "DEL", "CHECK")
            with self.locks.held(request.handle) if per_handle else contextlib.nullcontext():
                result = verbs[request.command](request)
            return 0, (json.dumps(result).encode() + b"\n") if result is not None else b""
        except CniError as exc:
            if exc.code != TRY_AGAIN_LATER:
                self.log.info("request refused", command=env.get("CNI_COMMAND"),
                              container=env.get("CNI_CONTAINERID"), code=exc.code,
                              error=exc.msg)
            doc_version = version if version in SUPPORTED_VERSIONS else LATEST
            return 1, json.dumps(exc.document(doc_version)).encode() + b"\n"
        except Exception as exc:
            self.log.exception("request failed", command=env.get("CNI_COMMAND"))
            error = CniError(INTERNAL, f"internal error in the l3fabric agent: {exc}")
            return 1, json.dumps(error.document(version)).encode() + b"\n"

    # -- verbs -------------------------------------------------------------------------
    def add(self, req: Request) -> dict[str, Any]:
        if not os.path.exists(req.netns_path):
            raise CniError(INVALID_ENV, f"CNI_NETNS {req.netns} does not exist")
        if links.same_namespace(req.netns_path):
            raise CniError(INVALID_ENV, f"CNI_NETNS {req.netns} is the host's own network "
                                        "namespace, not a container's")
        log = self.log.bind(handle=req.handle)
        host_if = links.host_ifname(req.handle) if req.plugin != IPAM_PLUGIN else None
        # Registered before the wiring, so that no moment exists where the kernel has a
        # workload etcd does not know (the agent's GC and inventory look there); and
        # in the allocation's own transaction, which also makes it "registered only
        # while the handle exists" (fabric.store.registry) with no round trip of its own.
        workload = Workload(req.handle, self.node, req.container_id, req.ifname, req.netns,
                            (), req.workload_name, host_if, time.time(), req.conf.name,
                            req.pod_namespace, dict(req.conf.labels))
        undo = Undo()
        try:
            done: Allocated | dict[str, Any] | None = self._add_new(req, workload, undo)
            if done is None:
                done = self._add_again(req, workload, host_if, undo, log)
            if isinstance(done, dict):
                return done  # a repeated ADD of an intact attachment
            record = done.record
            addresses = [a.address for a in record.allocations]
            attachment = None
            if host_if is not None:
                attachment = self._wire(req, host_if, addresses, undo)
        except BaseException:
            self._known.pop(req.handle, None)
            undo.run(log)
            raise
        if done.created and done.written and len(record.allocations) == 1:
            # What DEL needs to release in one transaction (see `delete`).
            self._known[req.handle] = Entry(keys.handle(req.handle), record.to_record(),
                                            done.revision, done.revision)
        log.info("attached", addresses=addresses, host_if=host_if, name=req.workload_name)
        return self._result(req, record, attachment).document(req.conf.version)

    def _registration(self, workload: Workload, committing: list[Handle]) -> AlsoPut:
        def records(record: Handle) -> list[tuple[str, dict[str, Any]]]:
            committing.append(record)
            return [(keys.workload(self.node, workload.handle), dataclasses.replace(
                workload, ips=tuple(record.addresses())).to_record())]
        return records

    def _add_new(self, req: Request, workload: Workload, undo: Undo) -> Allocated | None:
        """The common case, a container interface we have never seen, in one round trip:
        the allocation's transaction compares the handle and the registration absent
        and writes both. None (nothing written) when either exists: see `_add_again`."""
        committing: list[Handle] = []
        registration = keys.workload(self.node, req.handle)
        try:
            with _store_errors("ADD"):
                done = self._allocate(req, self._registration(workload, committing),
                                      also_absent=[registration])
        except KeyPresent:
            return None
        except BaseException:
            if committing:  # a commit was sent and may have landed
                undo.push("release addresses", lambda: self.ipam.release(req.handle))
                undo.push("deregister", lambda: self._deregister(req.handle))
            raise
        if not done.written:  # the handle held its addresses already
            return None
        if done.created:  # only what this ADD allocated is ours to give back
            undo.push("release addresses", lambda: self.ipam.release(req.handle))
        undo.push("deregister", lambda: self._deregister(req.handle))
        return done

    def _add_again(self, req: Request, workload: Workload, host_if: str | None, undo: Undo,
                   log: Any) -> Allocated | dict[str, Any]:
        """An ADD for a handle that holds addresses or is registered already: a retry
        from the runtime, or a repair. Read both first, as they decide."""
        with _store_errors("ADD"):
            registered, held, _ = self._attachment(req.handle)
        repeated = self._repeated(req, registered, held, host_if)
        if repeated is not None:
            log.info("ADD repeated for an intact attachment; same result")
            return repeated
        committing: list[Handle] = []
        try:
            with _store_errors("ADD"):
                done = self._allocate(req, self._registration(workload, committing))
        except BaseException:
            if committing:  # a commit was sent: it may have landed, in part
                if held is None:
                    undo.push("release addresses", lambda: self.ipam.release(req.handle))
                if registered is None:
                    undo.push("deregister", lambda: self._deregister(req.handle))
            raise
        if held is None:  # only what this ADD allocated is ours to give back
            undo.push("release addresses", lambda: self.ipam.release(req.handle))
        if not done.written:  # no commit: register as a step of its own
            with _store_errors("ADD"):
                self.registry.register_workload(dataclasses.replace(
                    workload, ips=tuple(done.record.addresses())))
        if registered is None:
            undo.push("deregister", lambda: self._deregister(req.handle))
        return done

    def _deregister(self, handle: str) -> None:
        self.registry.deregister_workload(self.node, handle)

    def _release(self, handle: str, known: Entry | None = None) -> None:
        """A workload of this node goes: its addresses and its registration, in one
        transaction (`known`: the handle's record as this agent wrote it, if it has it)."""
        self.ipam.release(handle, also_delete=[keys.workload(self.node, handle)],
                          known=known, node=self.node)

    def _wire(self, req: Request, host_if: str, addresses: list[str],
              undo: Undo) -> links.Attachment:
        try:
            if links.detach(host_if):  # a retried ADD starts clean
                self._release_adopted(host_if)
            attachment = links.attach(req.netns_path, req.ifname, host_if, addresses,
                                      req.conf.mtu)
        except links.LinkError as exc:
            raise CniError(IO_FAILURE, f"wiring {req.ifname}: {_as_runtime_named(req, exc)}"
                           ) from exc
        undo.push("remove veth", lambda: links.detach(host_if))
        undo.push("remove host routes",
                  lambda: self.routes.detach(req.handle, addresses, host_if))
        failures = self.routes.attach(req.handle, addresses, host_if, attachment.host_index,
                                      req.pod_namespace, req.conf.labels,
                                      req.workload_name or "")
        if failures:
            raise CniError(IO_FAILURE, f"host route: {failures[0]}")
        return attachment

    def _release_adopted(self, host_if: str) -> None:
        """The link this ADD replaces may have been adopted (its container outlived its
        etcd records, see the agent's `_adopt`): its addresses go with it, or they would
        stay held, and routed to the new container, for as long as the name lives."""
        handle = f"adopted.{host_if}"
        with _store_errors("ADD"):
            held = self.ipam.handle(handle)
            if held is None or held.node != self.node:
                return
            self.routes.detach(handle, list(held.addresses()), None)
            self._release(handle)
        self.log.info("released the addresses of the adopted link this ADD replaces",
                      handle=handle, addresses=list(held.addresses()))

    def _repeated(self, req: Request, registered: Workload | None, held: Handle | None,
                  host_if: str | None) -> dict[str, Any] | None:
        """The result of an earlier ADD of this very attachment, if it is all intact."""
        if registered is None or held is None or host_if is None:
            return None
        if (registered.container_id, registered.netns, registered.ifname) != \
                (req.container_id, req.netns, req.ifname):
            return None
        if not set(req.conf.families) <= held.families():
            return None
        addresses = list(held.addresses())
        attachment = links.attachment_of(host_if, req.netns_path, req.ifname, addresses)
        if attachment is None or self.routes.missing(addresses, attachment.host_index):
            return None
        return self._result(req, held, attachment).document(req.conf.version)

    def delete(self, req: Request) -> None:
        """Tear down whatever exists; everything already gone is fine.

        Deleting a veth makes the kernel wait an RCU grace period (about 20 ms), so DEL
        takes the routes away, sets the host end down (traffic stops) and deletes the
        pair in the background. An ADD for the same handle meanwhile removes the old
        pair itself; the background deletion then finds a different link and leaves it.
        """
        known = self._known.pop(req.handle, None)
        if known is not None and req.netns_path:
            # Added by this agent: what it wrote is known, and the release compares it
            # (a record changed since fails the compares and is read after all).
            registered, held, held_entry = None, Handle.from_record(known.value), known
        else:
            with _store_errors("DEL"):
                registered, held, held_entry = self._attachment(req.handle)
            if held is not None and held.node != self.node:
                # Another node's container with the same ID: its addresses are not ours
                # to release (`release(node=...)` checks again, in its transaction).
                self.log.warning("DEL of a handle held by another node; left alone",
                                 handle=req.handle, holder=held.node)
                held = held_entry = None
        addresses = list(held.addresses() if held else ())
        addresses += [a for a in (registered.ips if registered else ()) if a not in addresses]
        if req.plugin != IPAM_PLUGIN:
            host_if = links.host_ifname(req.handle)
            self.routes.detach(req.handle, addresses, host_if)
            try:
                if links.disable(host_if):  # no host end: no pair of ours (links.detach)
                    self._reap_soon()
            except links.LinkError as exc:
                raise CniError(IO_FAILURE, f"DEL: {exc}") from exc
        with _store_errors("DEL"):
            self._release(req.handle, known=held_entry)
        self.log.info("detached", handle=req.handle, addresses=addresses)

    def _reap_soon(self) -> None:
        """Delete the disabled pairs in REAP_DELAY, together with any disabled meanwhile.

        Each deletion of a veth holds the kernel's rtnl lock for an RCU grace period
        (about 20 ms), and every other request that touches links waits for it: one
        deletion per DEL made concurrent DELs and ADDs queue behind each other. Here a
        burst of DELs pays one grace period. An ADD for the same handle meanwhile
        deletes the old pair itself (`_wire`); a new pair is never in the group.
        """
        with self._reap_lock:
            if self._reap_due:
                return
            self._reap_due = True
        self._unwire.submit(self._reap)

    def _reap(self) -> None:
        time.sleep(REAP_DELAY)
        with self._reap_lock:
            self._reap_due = False  # pairs disabled from here on need another round
        try:
            links.remove_doomed()
        except links.LinkError as exc:
            self.log.error("could not delete detached veths", error=str(exc))

    def drain(self) -> None:
        """Finish background deletions (tests, shutdown)."""
        self._unwire.shutdown(wait=True)
        self._unwire = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cni-unwire")

    def _attachment(self, handle: str) -> tuple[Workload | None, Handle | None, Entry | None]:
        """The registration and the IPAM record (and its entry) of a handle, in one
        round trip."""
        rows = self.ipam.store.read_many([get_op(keys.workload(self.node, handle)),
                                          get_op(keys.handle(handle))])
        registered = held = entry = None
        if rows[0] and isinstance(rows[0][0], Entry):
            registered = parsed(rows[0][0], Workload.from_record, "workload")
        if rows[1] and isinstance(rows[1][0], Entry):
            entry = rows[1][0]
            held = parsed(entry, Handle.from_record, "handle")
        return registered, held, entry

    def check(self, req: Request) -> None:
        with _store_errors("CHECK"):
            registered, held, _ = self._attachment(req.handle)
        if held is None:
            raise CniError(CHECK_FAILED, f"{req.handle} holds no addresses")
        if registered is None:
            raise CniError(CHECK_FAILED, f"{req.handle} is not registered on {self.node}")
        addresses = list(held.addresses())
        if req.conf.prev_result is not None:
            prev = Result.parse(req.conf.prev_result)
            expected = sorted(ip.address.split("/")[0] for ip in prev.ips)
            if expected != sorted(addresses):
                raise CniError(CHECK_FAILED, f"prevResult has {expected}, IPAM holds "
                                             f"{sorted(addresses)}")
        if req.plugin == IPAM_PLUGIN:
            return
        host_if = links.host_ifname(req.handle)
        problems = links.inspect(host_if, req.netns_path, req.ifname, addresses)
        index = links.host_links().get(host_if)
        problems += [f"no host route for {a} out of {host_if}"
                     for a in self.routes.missing(addresses, index)]
        if problems:
            raise CniError(CHECK_FAILED, _as_runtime_named(req, "; ".join(problems)))

    def gc(self, req: Request) -> None:
        """Release every attachment of this network on this node not in the valid list."""
        valid = {f"{cid}.{ifname}" for cid, ifname in req.conf.valid_attachments or ()}
        with _store_errors("GC"):
            registered = {w.handle: w for w in self.registry.workloads(self.node)
                          if w.network == req.conf.name}
            held = {h.handle: h for h in self.ipam.handles(self.node)
                    if h.attrs.get("network") == req.conf.name}
        stale = sorted((set(registered) | set(held)) - valid)
        failed = []
        for handle in stale:
            workload_ = registered.get(handle)
            try:
                addresses = set(workload_.ips if workload_ else ())
                if handle in held:
                    addresses |= set(held[handle].addresses())
                host_if = workload_.host_ifname if workload_ else None
                with self.locks.held(handle):
                    self._known.pop(handle, None)
                    self.routes.detach(handle, sorted(addresses), host_if)
                    if host_if:
                        links.detach(host_if)
                    self.registry.deregister_workload(self.node, handle)
                    self.ipam.release(handle)
            except Exception as exc:  # GC keeps going and reports at the end
                failed.append(f"{handle}: {exc}")
        if stale:
            self.log.info("gc released stale attachments", released=len(stale) - len(failed),
                          failed=len(failed))
        if failed:
            raise CniError(IO_FAILURE, f"GC could not release {len(failed)} attachment(s)",
                           "; ".join(failed))

    def release_gone(self, handle: str, host_if: str) -> bool:
        """Release a workload whose host link is gone (the agent saw it missing for its
        grace period); False when the link is back or the handle is another node's.
        Under the handle's lock, so an ADD of the same handle is never cut short."""
        with self.locks.held(handle):
            if host_if in links.host_links():
                return False
            workload_ = self.registry.workload(self.node, handle)
            held = self.ipam.handle(handle)
            if workload_ is None or workload_.host_ifname != host_if:
                return False  # DEL'd or re-ADDed meanwhile: not what was seen gone
            if workload_.netns and os.path.exists(workload_.netns):
                # Its namespace is still there: the container may live on with its
                # addresses (its host link deleted by hand). Given to another container
                # they would be in use twice; kept, and asked about again later.
                self.log.warning("host link gone but the container's namespace is not; "
                                 "its addresses stay allocated", handle=handle,
                                 netns=workload_.netns)
                return False
            addresses = sorted(set(workload_.ips) | set(held.addresses() if held else ()))
            self._known.pop(handle, None)
            self.routes.detach(handle, addresses, host_if)
            self._release(handle)
        self.log.info("released a workload whose host link is gone", handle=handle,
                      addresses=addresses)
        return True

    def status(self, req: Request) -> None:
        try:
            self.ipam.store.ping()
            pools = [p for p in self.ipam.pools() if not p.disabled]
        except DatastoreError as exc:
            raise CniError(NOT_READY, f"etcd is unreachable from the agent: {exc}") from exc
        wanted = set(req.conf.pools or [])
        usable = [p for p in pools if (not wanted or p.name in wanted)
                  and p.family in req.conf.families]
        if not usable:
            raise CniError(NOT_READY, "no enabled IP pool to allocate from"
                           + (f" among {', '.join(sorted(wanted))}" if wanted else ""))

    # -- helpers -----------------------------------------------------------------------
    def _allocate(self, req: Request, also_put: AlsoPut,
                  also_absent: Sequence[str] = ()) -> Allocated:
        attrs = {"netns": req.netns, "network": req.conf.name,
                 "container_id": req.container_id, "ifname": req.ifname,
                 "namespace": req.pod_namespace,
                 "labels": json.dumps(req.conf.labels, sort_keys=True)}
        try:
            return self.ipam.allocate_with(req.handle, self.node, families=req.conf.families,
                                           pools=req.conf.pools, attrs=attrs,
                                           also_put=also_put, also_absent=also_absent,
                                           subnet=req.plugin == IPAM_PLUGIN)
        except Exhausted as exc:
            raise CniError(NO_ADDRESS, str(exc)) from exc
        except HandleElsewhere as exc:
            raise CniError(INVALID_ENV, f"CNI_CONTAINERID {req.container_id}: {exc}") from exc
        except IpamError as exc:
            raise CniError(NO_ADDRESS, f"cannot allocate: {exc}") from exc

    def _result(self, req: Request, record: Handle,
                attachment: links.Attachment | None) -> Result:
        result = Result(dns=req.conf.dns or self.dns)
        if attachment is not None:
            result.interfaces = [
                Interface(attachment.host_ifname, links.HOST_MAC),
                Interface(req.ifname, attachment.container_mac, req.netns)]
        for allocation in record.allocations:
            gateway = links.GATEWAY[allocation.family]
            if attachment is not None:
                result.ips.append(IpConfig(allocation.host_prefix, gateway, 1))
            else:
                # For another main plugin (ptp, bridge): the block's prefix length, so it
                # has a subnet route to replace (the address is never one of the block's
                # edges: `allocate_with(subnet=True)`), and our link-local gateway, so it
                # never puts a pool address on the host.
                length = allocation.block.split("/")[1]
                result.ips.append(IpConfig(f"{allocation.address}/{length}", gateway))
        if attachment is None:
            result.routes = [RouteConfig(dst, gw) for dst, gw in req.conf.ipam_routes]
            return result
        for family in sorted({a.family for a in record.allocations}):
            result.routes.append(RouteConfig("::/0" if family == 6 else "0.0.0.0/0",
                                             links.GATEWAY[family]))
        return result


@contextlib.contextmanager
def _store_errors(verb: str) -> Iterator[None]:
    """etcd trouble becomes "try again later"; anything else stays what it is."""
    try:
        yield
    except Unavailable as exc:
        raise CniError(TRY_AGAIN_LATER, f"{verb}: etcd is unreachable: {exc}") from exc
    except RegistrationError as exc:
        raise CniError(TRY_AGAIN_LATER, f"{verb}: {exc}") from exc
    except DatastoreError as exc:
        raise CniError(IO_FAILURE, f"{verb}: datastore error: {exc}") from exc


def _as_runtime_named(req: Request, error: object) -> str:
    """The agent opens the container's namespace through the descriptor the plugin
    passed (`/proc/self/fd/N`): messages name it as the runtime did (CNI_NETNS)."""
    text = str(error)
    return text.replace(req.netns_path, req.netns) if req.netns_path and req.netns else text
