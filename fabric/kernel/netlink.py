"""A minimal rtnetlink route codec and socket, built for bulk.

pyroute2 encodes each message through its generic `rtmsg` class and manages about
2,500 routes/s; the kernel itself accepts about 70,000/s (see docs/performance.md).
Route messages have a fixed shape, so here they are packed with `struct`, many per
`send()`, without asking for an ACK per message: the kernel reports failures
asynchronously as NLMSG_ERROR carrying the request's sequence number, and a final
ACKed no-op tells us when everything before it was processed.

Dumps ask the kernel to filter by table and protocol (strict checking, Linux >= 4.20)
and are parsed with `struct` too. Only what the kernel writer needs is decoded: type,
destination, gateways (also inside RTA_MULTIPATH) and output interface.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fabric.kernel.routes import Failure, Route
from fabric.model.prefix import Prefix

# netlink / rtnetlink constants (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_REPLACE, NLM_F_CREATE = 0x300, 0x100, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 9, 15
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RT_TABLE_MAIN = 254
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_GET_STRICT_CHK = 10, 12
RTMGRP_LINK, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400
SO_ATTACH_FILTER = 26

NLMSGHDR = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")
RTATTR = struct.Struct("=HH")
RTNEXTHOP = struct.Struct("=HBBi")
NLMSGERR = struct.Struct("=i")
U32 = struct.Struct("=I")

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
_SEND_CHUNK = 64 * 1024  # well under the socket send buffer


class NetlinkError(OSError):
    """The kernel refused a request: its errno (also as `.code`) and text."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code, message or os.strerror(code))

    @property
    def code(self) -> int:
        return int(self.errno or 0)


def attr(kind: int, payload: bytes) -> bytes:
    """One route attribute (type, length, payload, padding to 4 bytes)."""
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)



def _gateway(gateway: str) -> tuple[int, bytes]:
    family = 6 if ":" in gateway else 4
    return family, socket.inet_pton(_AF[family], gateway)


def encode_route(route: Route, seq: int, protocol: int, delete: bool = False,
                 flags: int = 0) -> bytes:
    """One RTM_NEWROUTE (create or replace) or RTM_DELROUTE message."""
    prefix = route.prefix
    attrs = [attr(RTA_DST, prefix.packed)]
    rtype = RTN_BLACKHOLE if route.type == "blackhole" else RTN_UNICAST
    # A delete must match the route's scope exactly unless it says "nowhere", which
    # matches any (as `ip route del` does): a workload's /32 has link scope.
    scope = RT_SCOPE_NOWHERE if delete else RT_SCOPE_UNIVERSE
    if not delete and rtype == RTN_UNICAST:
        if len(route.gateways) == 1:
            attrs.append(attr(RTA_GATEWAY, _gateway(route.gateways[0])[1]))
        elif route.gateways:
            hops = b""
            for gateway in route.gateways:
                gw = attr(RTA_GATEWAY, _gateway(gateway)[1])
                hops += RTNEXTHOP.pack(RTNEXTHOP.size + len(gw), 0, 0, 0) + gw
            attrs.append(attr(RTA_MULTIPATH, hops))
        if route.oif:
            attrs.append(attr(RTA_OIF, U32.pack(route.oif)))
            if not route.gateways:
                scope = RT_SCOPE_LINK
    body = RTMSG.pack(_AF[prefix.family], prefix.length, 0, 0, RT_TABLE_MAIN, protocol,
                      scope, rtype, 0) + b"".join(attrs)
    kind = RTM_DELROUTE if delete else RTM_NEWROUTE
    nl_flags = NLM_F_REQUEST | flags
    if not delete:
        nl_flags |= NLM_F_CREATE | NLM_F_REPLACE
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, nl_flags, seq, 0) + body


def encode_dump(family: int, seq: int, protocol: int) -> bytes:
    body = RTMSG.pack(_AF[family], 0, 0, 0, RT_TABLE_MAIN, protocol, 0, 0, 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETROUTE,
                         NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


@dataclass(frozen=True)
class Message:
    type: int
    flags: int
    seq: int
    payload: memoryview
    pid: int = 0  # the port id of the socket whose request caused it (0: the kernel)


def split(data: bytes | memoryview) -> Iterator[Message]:
    view = memoryview(data)
    offset = 0
    while offset + NLMSGHDR.size <= len(view):
        length, kind, flags, seq, pid = NLMSGHDR.unpack_from(view, offset)
        if length < NLMSGHDR.size:
            break
        yield Message(kind, flags, seq, view[offset + NLMSGHDR.size:offset + length], pid)
        offset += (length + 3) & ~3


def each_attr(view: memoryview | bytes, offset: int = 0) -> Iterator[tuple[int, memoryview]]:
    """The attributes from `offset` on, in order, as (type, payload)."""
    view = memoryview(view)
    while offset + RTATTR.size <= len(view):
        length, kind = RTATTR.unpack_from(view, offset)
        if length < RTATTR.size:
            break
        yield kind & 0x3FFF, view[offset + RTATTR.size:offset + length]
        offset += (length + 3) & ~3


def decode_route(payload: memoryview) -> tuple[Route, int, int] | None:
    """(route, protocol, table) of an RTM_NEWROUTE payload; None for what we skip."""
    af, dst_len, _, _, table, protocol, _, rtype, _ = RTMSG.unpack_from(payload, 0)
    family = _FAMILY.get(af)
    if family is None or rtype not in (RTN_UNICAST, RTN_BLACKHOLE):
        return None
    dst = b"\0" * (16 if family == 6 else 4)
    gateways: list[str] = []
    oif = 0
    for kind, value in each_attr(payload, RTMSG.size):
        if kind == RTA_DST:
            dst = bytes(value)
        elif kind == RTA_GATEWAY:
            gateways.append(socket.inet_ntop(af, bytes(value)))
        elif kind == RTA_OIF:
            oif = U32.unpack_from(value)[0]
        elif kind == RTA_TABLE:
            table = U32.unpack_from(value)[0]
        elif kind == RTA_MULTIPATH:
            offset = 0
            while offset + RTNEXTHOP.size <= len(value):
                hop_len, _, _, _ = RTNEXTHOP.unpack_from(value, offset)
                if hop_len < RTNEXTHOP.size:
                    break
                hop = value[offset:offset + hop_len]
                for sub, sub_value in each_attr(hop, RTNEXTHOP.size):
                    if sub == RTA_GATEWAY:
                        gateways.append(socket.inet_ntop(af, bytes(sub_value)))
                offset += (hop_len + 3) & ~3
    prefix = Prefix(family, int.from_bytes(dst, "big"), dst_len)
    if rtype == RTN_BLACKHOLE:
        return Route(prefix, "blackhole", (), 0, "blackhole"), protocol, table
    # With gateways the kernel reports the interface it resolved; we never ask for one.
    route = Route(prefix, "unicast", tuple(sorted(gateways)), 0 if gateways else oif)
    return route, protocol, table


class RouteSocket:
    """One NETLINK_ROUTE socket in the namespace it was opened in."""

    def __init__(self, protocol: int, groups: int = 0) -> None:
        self.protocol = protocol
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without our payload
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self.strict = True
        except OSError:
            self.strict = False
        self.sock.bind((0, groups))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def apply(self, replace: Iterable[Route] = (), delete: Iterable[Route] = ()
              ) -> list[Failure]:
        """Send every change in large batches; return the ones the kernel refused.

        Deletes go first so that a prefix moving from one kind to another never
        collides with itself. A delete of a route that is already gone is not a failure.
        """
        pending: dict[int, tuple[Route, bool]] = {}
        buffer = bytearray()
        failures: list[Failure] = []
        ops = [(r, True) for r in delete] + [(r, False) for r in replace]
        for route, is_delete in ops:
            seq = self._next_seq()
            pending[seq] = (route, is_delete)
            buffer += encode_route(route, seq, self.protocol, delete=is_delete)
            if len(buffer) >= _SEND_CHUNK:
                self.sock.send(buffer)
                buffer.clear()
                failures += self._drain(pending, block=False)
        # The last message asks for an ACK: the kernel handles one socket's requests in
        # order, so when it is acknowledged every earlier reply has been queued.
        fence = self._next_seq()
        buffer += encode_fence(fence)
        self.sock.send(buffer)
        failures += self._drain(pending, block=True, fence=fence)
        return failures

    def _drain(self, pending: dict[int, tuple[Route, bool]], block: bool,
               fence: int = -1) -> list[Failure]:
        failures: list[Failure] = []
        while True:
            try:
                data = self.sock.recv(1 << 20, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return failures
            for msg in split(data):
                if msg.type != NLMSG_ERROR:
                    continue
                (code,) = NLMSGERR.unpack_from(msg.payload)
                if msg.seq == fence:
                    return failures
                entry = pending.pop(msg.seq, None)
                if entry is None or code == 0:
                    continue
                route, is_delete = entry
                if is_delete and -code == errno.ESRCH:
                    continue
                failures.append(Failure(route, is_delete, -code))

    def dump(self, families: Iterable[int] = (4, 6)) -> list[Route]:
        """Every route of our protocol in the main table."""
        routes: list[Route] = []
        for family in families:
            seq = self._next_seq()
            self.sock.send(encode_dump(family, seq, self.protocol if self.strict else 0))
            done = False
            while not done:
                data = self.sock.recv(1 << 20)
                for msg in split(data):
                    if msg.seq != seq:
                        continue
                    if msg.type == NLMSG_DONE:
                        done = True
                        break
                    if msg.type == NLMSG_ERROR:
                        (code,) = NLMSGERR.unpack_from(msg.payload)
                        if code:
                            raise NetlinkError(-code, f"route dump: {os.strerror(-code)}")
                        continue
                    if msg.type != RTM_NEWROUTE:
                        continue
                    decoded = decode_route(msg.payload)
                    if decoded is None:
                        continue
                    route, protocol, table = decoded
                    if protocol == self.protocol and table == RT_TABLE_MAIN:
                        routes.append(route)
        return routes

    def count(self, family: int = 4) -> int:
        """How many routes of our protocol the main table holds (a dump, not decoded)."""
        seq = self._next_seq()
        self.sock.send(encode_dump(family, seq, self.protocol if self.strict else 0))
        total = 0
        unpack = NLMSGHDR.unpack_from
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _, msg_seq, _ = unpack(data, offset)
                if length < NLMSGHDR.size:
                    break
                if msg_seq == seq:
                    if kind == NLMSG_DONE:
                        return total
                    if kind == RTM_NEWROUTE:
                        total += 1
                offset += (length + 3) & ~3

    def ignore_sender(self, portid: int) -> None:
        """Have the kernel drop, before they reach this socket, the notifications caused
        by the socket with `portid` (our own writer's: at 100,000 routes, receiving
        and skipping their echoes cost the agent 0.4 s of CPU each way). A classic BPF
        filter on the netlink header's pid; `events(skip_pid=)` still skips any that
        arrive batched behind another message."""
        # BPF loads words big-endian; the netlink header is in host order.
        pid = int.from_bytes(portid.to_bytes(4, sys.byteorder), "big")
        program = b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in (
            (0x20, 0, 0, 12),          # ld  [12]  (nlmsg_pid)
            (0x15, 0, 1, pid),         # jeq #pid, next, accept
            (0x06, 0, 0, 0),           # ret #0    (drop)
            (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1   (keep all of it)
        ))
        buffer = ctypes.create_string_buffer(program)
        fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buffer))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def events(self, timeout: float | None, skip_pid: int = -1) -> list[Message]:
        """Messages from subscribed groups (blocking up to `timeout`), leaving out those
        caused by the socket with port id `skip_pid` (our own writer: at 100,000 routes
        its echoes are most of what arrives, and are skipped without being decoded)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # we fell behind: caller resyncs anyway
                return [Message(NLMSG_ERROR, 0, 0, memoryview(b"\0\0\0\0"))]
            raise
        finally:
            self.sock.settimeout(None)
        if skip_pid < 0:
            return list(split(data))
        found = []
        view, offset, unpack = memoryview(data), 0, NLMSGHDR.unpack_from
        while offset + NLMSGHDR.size <= len(view):
            length, kind, flags, seq, pid = unpack(view, offset)
            if length < NLMSGHDR.size:
                break
            if pid != skip_pid:
                found.append(Message(kind, flags, seq,
                                     view[offset + NLMSGHDR.size:offset + length], pid))
            offset += (length + 3) & ~3
        return found


def encode_fence(seq: int) -> bytes:
    """A harmless ACKed request: delete a /0 blackhole of a protocol nobody uses.

    Any request with NLM_F_ACK would do; this one never changes anything (it fails
    with ESRCH, which is the acknowledgement we wait for).
    """
    body = RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, 255, 0, RTN_BLACKHOLE, 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_DELROUTE,
                         NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def route_event(msg: Message, protocol: int) -> tuple[bool, Route] | None:
    """(deleted?, route) for a route event of `protocol` in the main table."""
    if msg.type not in (RTM_NEWROUTE, RTM_DELROUTE):
        return None
    decoded = decode_route(msg.payload)
    if decoded is None:
        return None
    route, proto, table = decoded
    if proto != protocol or table != RT_TABLE_MAIN:
        return None
    return msg.type == RTM_DELROUTE, route

