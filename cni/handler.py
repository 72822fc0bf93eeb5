"""The CNI verbs, run inside the node agent for each request the shim forwards.

ADD, DEL, CHECK, GC and STATUS side by side, as the reference plugins read. The kernel
work is in `fabric.kernel.links`; addresses come from `ipam`; workloads are registered
in etcd so check, GC and DNS can see them.

A failed ADD leaves nothing behind: every step that made something registers its
undo, and the undo runs in reverse order before the error is returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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
from fabric.kernel.reconciler import Reconciler
from fabric.kernel.routes import Route, workload
from fabric.model.handles import Exhausted, Handle, IpamError
from fabric.model.nodes import Workload
from fabric.model.prefix import Prefix
from fabric.store import keys
from fabric.store.datastore import Entry, get_op
from fabric.store.errors import DatastoreError, Unavailable
from fabric.store.registry import RegistrationError, Registry
from ipam.allocator import Ipam

# Plugin-specific error codes (the spec leaves 100 and up to plugins).
NO_ADDRESS = 100
CHECK_FAILED = 101
INTERNAL = 199


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


class CniHandler:
    def __init__(self, node: str, ipam: Ipam, registry: Registry, routes: Reconciler,
                 dns: Mapping[str, Any] | None = None) -> None:
        self.node = node
        self.ipam = ipam
        self.registry = registry
        self.routes = routes
        self.dns = dict(dns or {})
        self.log = logs.get("cni", node=node)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cni-unwire")
        self._pending: dict[str, Future[None]] = {}

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
        log = self.log.bind(handle=req.handle)
        self.wait_pending(req.handle)  # a DEL of this handle may still be deleting its veth
        undo = Undo()
        try:
            with _store_errors("ADD"):
                record = self._allocate(req)
                undo.push("release addresses", lambda: self.ipam.release(req.handle))
            addresses = [a.address for a in record.allocations]
            host_if = links.host_ifname(req.handle) if req.plugin != IPAM_PLUGIN else None
            # Registered before the wiring: the agent's periodic refresh rebuilds the
            # workload routes from registrations, and must not see a wired but not yet
            # registered interface (it would drop the route just installed).
            with _store_errors("ADD"):
                self.registry.register_workload(Workload(
                    req.handle, self.node, req.container_id, req.ifname, req.netns,
                    tuple(addresses), req.workload_name, host_if,
                    network=req.conf.name))
                undo.push("deregister",
                          lambda: self.registry.deregister_workload(self.node, req.handle))
            attachment = None
            if host_if is not None:
                links.detach(host_if, None, req.ifname)  # a retried ADD starts clean
                try:
                    attachment = links.attach(req.netns_path, req.ifname, host_if, addresses,
                                              req.conf.mtu)
                except links.LinkError as exc:
                    raise CniError(IO_FAILURE, f"wiring {req.ifname}: {exc}") from exc
                undo.push("remove veth", lambda: links.detach(host_if, req.netns_path, req.ifname))
                wanted = self._workload_routes(addresses, attachment.host_index)
                undo.push("remove host routes",
                          lambda: self.routes.install_now("workloads", dict.fromkeys(wanted)))
                failures = self.routes.install_now("workloads", wanted)
                if failures:
                    raise CniError(IO_FAILURE, f"host route: {failures[0]}")
        except BaseException:
            undo.run(log)
            raise
        log.info("attached", addresses=addresses, host_if=host_if, name=req.workload_name)
        return self._result(req, record, attachment).document(req.conf.version)

    def delete(self, req: Request) -> None:
        """Tear down whatever exists; everything already gone is fine.

        Deleting a veth makes the kernel wait an RCU grace period (about 20 ms), so DEL
        sets the host end down (traffic stops, its route goes) and deletes the pair in
        the background; an ADD for the same handle waits for that deletion first.
        """
        with _store_errors("DEL"):
            registered, held = self._attachment(req.handle)
        netns = req.netns_path or (registered.netns if registered else "")
        addresses = list(held.addresses() if held else ())
        addresses += [a for a in (registered.ips if registered else ()) if a not in addresses]
        if req.plugin != IPAM_PLUGIN:
            host_if = links.host_ifname(req.handle)
            index = links.disable(host_if)
            self.routes.install_now("workloads", dict.fromkeys(
                Prefix.parse(a) for a in addresses))
            if index is None:  # no host end: remove a half-made container end, if any
                links.detach(host_if, netns, req.ifname)
            else:
                self._pending[req.handle] = self._pool.submit(links.remove, host_if, index)
        with _store_errors("DEL"):
            self.ipam.release(req.handle, also_delete=[keys.workload(self.node, req.handle)])
        self.log.info("detached", handle=req.handle, addresses=addresses)

    def wait_pending(self, handle: str | None = None) -> None:
        """Finish background deletions (of one handle, or all)."""
        for key in [handle] if handle else list(self._pending):
            future = self._pending.pop(key, None) if key else None
            if future is not None:
                future.result()

    def _attachment(self, handle: str) -> tuple[Workload | None, Handle | None]:
        """The registration and the IPAM record of a handle, in one round trip."""
        rows = self.ipam.store.read_many([get_op(keys.workload(self.node, handle)),
                                          get_op(keys.handle(handle))])
        registered = held = None
        if rows[0] and isinstance(rows[0][0], Entry):
            registered = Workload.from_record(rows[0][0].value)
        if rows[1] and isinstance(rows[1][0], Entry):
            held = Handle.from_record(rows[1][0].value)
        return registered, held

    def check(self, req: Request) -> None:
        with _store_errors("CHECK"):
            registered, held = self._attachment(req.handle)
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
        problems = links.inspect(links.host_ifname(req.handle), req.netns_path, req.ifname,
                                 addresses)
        desired = self.routes.source("workloads")
        problems += [f"no host route for {a}" for a in addresses
                     if Prefix.parse(a) not in desired]
        if problems:
            raise CniError(CHECK_FAILED, "; ".join(problems))

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
                if workload_ and workload_.host_ifname:
                    links.detach(workload_.host_ifname, None, workload_.ifname)
                addresses = set(workload_.ips if workload_ else ())
                if handle in held:
                    addresses |= set(held[handle].addresses())
                self.routes.install_now("workloads", dict.fromkeys(
                    Prefix.parse(a) for a in addresses))
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
    def _allocate(self, req: Request) -> Handle:
        attrs = {"netns": req.netns, "network": req.conf.name,
                 "container_id": req.container_id, "ifname": req.ifname}
        try:
            return self.ipam.allocate(req.handle, self.node, families=req.conf.families,
                                      pools=req.conf.pools, attrs=attrs)
        except Exhausted as exc:
            raise CniError(NO_ADDRESS, str(exc)) from exc
        except IpamError as exc:
            raise CniError(NO_ADDRESS, f"cannot allocate: {exc}") from exc

    @staticmethod
    def _workload_routes(addresses: list[str], index: int) -> dict[Prefix, Route]:
        return {Prefix.parse(a): workload(Prefix.parse(a), index) for a in addresses}

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
                # has a subnet route to replace, and our link-local gateway, so it never
                # puts a pool address on the host.
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
