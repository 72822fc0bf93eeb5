"""The per-container data path: a veth pair wired the way Calico wires it.

Host side: an interface named from the container's handle, with no address, a fixed
MAC (ee:ee:ee:ee:ee:ee, so the container's gateway entry is known before the link
exists), proxy ARP on with no delay, forwarding on. Container side: the runtime's
interface name with the /32 (/128) addresses, a permanent neighbour entry for the
gateway and a default route via 169.254.1.1 (fe80::ecee:eeff:feee:eeee for IPv6)
on-link. The gateway address exists nowhere: the container sends everything to the
host's MAC and the host routes it.

Why both proxy ARP and a permanent neighbour entry: proxy ARP answers only when the
host has a route towards the asked address through another interface, which a host
without a default route does not have; the permanent entry also saves the first
packet's ARP round trip. Proxy ARP stays on for anything else the container asks.

The host end is created directly in the host namespace with its peer created
directly in the container's namespace (one netlink request), which is cheaper than
moving a link between namespaces (that serialises on the kernel's rtnl lock). The
container end gets its MAC from us in that same request, so nothing is read back.

Deleting a veth makes the kernel wait an RCU grace period (about 20 ms) with the
rtnl lock held, which every other link request on the host then waits for. So a
detached pair is first set down and put in the DOOMED interface group (`disable`),
and `remove_doomed` later deletes the whole group with one request: one grace period
for however many pairs, instead of one each.

The messages are packed here with `struct` on a plain NETLINK_ROUTE socket: about ten
small requests per container, where pyroute2 spent about 0.8 ms of CPU on each (its
asyncio loop per request, generic encoding and decoding) and 9 ms per ADD, more than
the kernel work itself (docs/performance.md). Errors are `netlink.NetlinkError`
(errno in `.code`). Importing pyroute2 at all (its package imports every module it
has) cost the agent 22 MB of memory; nothing of it is used here any more. Routes of
our protocol are not written here; the agent (`fabric.kernel.writer`, fed by its
owner loop) owns them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from fabric.kernel.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR,
    NLMSGHDR,
    RT_TABLE_MAIN,
    RTA_GATEWAY,
    RTA_OIF,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    RTMSG,
    RTN_UNICAST,
    U32,
    NetlinkError,
    each_attr,
)
from fabric.kernel.netlink import attr as _attr
from fabric.kernel.netns import NetnsError, entered

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY = {4: "169.254.1.1", 6: "fe80::ecee:eeff:feee:eeee"}
HOST_PREFIX = "l3f"
# Interface group of detached pairs waiting for `remove_doomed` ("l3f" in ASCII).
DOOMED = 0x6C3366
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
IFA_F_NODAD = 0x02

# rtnetlink for links, addresses and neighbours (linux/if_link.h, linux/veth.h); the
# header, route message and attribute encoding are shared with `netlink`.
NLM_F_EXCL = 0x200
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWNEIGH = 28
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE = 1, 3, 4, 16
IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD = 18, 27, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
NDA_DST, NDA_LLADDR = 1, 2
IFF_UP = 0x1
RTPROT_BOOT = 3
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")

IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBi")
NDMSG = struct.Struct("=BxxxiHBB")
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


class LinkError(RuntimeError):
    """The data path could not be built; the message says which step failed."""


def host_ifname(handle: str) -> str:
    """`l3f` + 12 hex digits of the handle's hash: stable, unique, within 15 characters."""
    return HOST_PREFIX + hashlib.sha256(handle.encode()).hexdigest()[:12]


def family_of(address: str) -> int:
    return 6 if ":" in address else 4


@dataclass(frozen=True)
class Attachment:
    host_ifname: str
    host_index: int
    container_mac: str


# -- netlink messages ------------------------------------------------------------------
def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _attrs(view: memoryview | bytes, offset: int = 0) -> dict[int, memoryview]:
    """Attributes from `offset` on, by type (the last of a repeated type wins)."""
    return dict(each_attr(view, offset))


def _text(raw: memoryview | None) -> str:
    return bytes(raw or b"").split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Link:
    """What we read of an interface: index, flags and a few attributes."""

    index: int
    flags: int
    name: str
    mac: str
    operstate: str
    kind: str
    group: int

    @classmethod
    def decode(cls, payload: memoryview) -> Link:
        _, _, index, flags, _ = IFINFOMSG.unpack_from(payload, 0)
        attrs = _attrs(payload, IFINFOMSG.size)
        info = _attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
        state = attrs.get(IFLA_OPERSTATE)
        group = attrs.get(IFLA_GROUP)
        return cls(index, flags, _text(attrs.get(IFLA_IFNAME)),
                   _mac_text(bytes(attrs.get(IFLA_ADDRESS, b""))),
                   OPERSTATES[state[0]] if state and state[0] < len(OPERSTATES) else "UNKNOWN",
                   _text(info.get(IFLA_INFO_KIND)), U32.unpack(group)[0] if group else 0)


class _Rtnl:
    """One NETLINK_ROUTE socket, in the network namespace of the thread that opened it
    (it stays there when the thread leaves). One request at a time, each answered
    before the next; errors raise NetlinkError with the kernel's errno."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def request(self, kind: int, body: bytes, flags: int = 0) -> list[memoryview]:
        """Send one request; the payloads of what the kernel answered (a dump's
        messages, a GET's reply, nothing for an acknowledged change)."""
        self.seq += 1
        seq = self.seq
        flags |= NLM_F_REQUEST | (0 if kind % 4 == 2 else NLM_F_ACK)  # GETs get replies
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body)
        replies: list[memoryview] = []
        while True:
            view = memoryview(self.sock.recv(1 << 16))
            offset = 0
            while offset + NLMSGHDR.size <= len(view):
                length, mtype, _, mseq, _ = NLMSGHDR.unpack_from(view, offset)
                if length < NLMSGHDR.size:
                    break
                payload = view[offset + NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue  # a late answer to an earlier request
                if mtype == NLMSG_ERROR:
                    code = -NLMSGERR.unpack_from(payload, 0)[0]
                    if code:
                        raise NetlinkError(code)
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append(payload)
                if flags & NLM_F_DUMP != NLM_F_DUMP:
                    return replies  # a GET's single reply

    # -- links -------------------------------------------------------------------------
    def link(self, name: str) -> Link | None:
        try:
            (reply,) = self.request(RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0)
                                    + _attr(IFLA_IFNAME, _name(name)))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        return Link.decode(reply)

    def links(self) -> list[Link]:
        return [Link.decode(r) for r in self.request(
            RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0), NLM_F_DUMP)]

    def set_link(self, index: int, up: bool, name: str = "", group: int | None = None
                 ) -> None:
        """Set a link up or down (by index, or by name with index 0), and its group."""
        attrs = _attr(IFLA_IFNAME, _name(name)) if name else b""
        if group is not None:
            attrs += _attr(IFLA_GROUP, U32.pack(group))
        self.request(RTM_NEWLINK, IFINFOMSG.pack(0, 0, index, IFF_UP if up else 0, IFF_UP)
                     + attrs)

    def delete_link(self, index: int, group: int | None = None) -> None:
        attrs = _attr(IFLA_GROUP, U32.pack(group)) if group is not None else b""
        self.request(RTM_DELLINK, IFINFOMSG.pack(0, 0, index, 0, 0) + attrs)

    def add_veth(self, name: str, mac: str, mtu: int, peer: str, peer_mac: str,
                 peer_ns_fd: int) -> None:
        peer_info = (IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer))
                     + _attr(IFLA_ADDRESS, _mac(peer_mac)) + _attr(IFLA_MTU, U32.pack(mtu))
                     + _attr(IFLA_NET_NS_FD, U32.pack(peer_ns_fd)))
        info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA,
                                                      _attr(VETH_INFO_PEER, peer_info))
        self.request(RTM_NEWLINK, IFINFOMSG.pack(0, 0, 0, 0, 0)
                     + _attr(IFLA_IFNAME, _name(name)) + _attr(IFLA_ADDRESS, _mac(mac))
                     + _attr(IFLA_MTU, U32.pack(mtu)) + _attr(IFLA_LINKINFO, info),
                     NLM_F_CREATE | NLM_F_EXCL)

    # -- addresses, neighbours, routes ---------------------------------------------------
    def add_address(self, index: int, address: str) -> None:
        family = family_of(address)
        packed = socket.inet_pton(_AF[family], address)
        flags = IFA_F_NODAD if family == 6 else 0
        self.request(RTM_NEWADDR, IFADDRMSG.pack(_AF[family], 128 if family == 6 else 32,
                                                 flags, 0, index)
                     + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
                     + _attr(IFA_FLAGS, U32.pack(flags)), NLM_F_CREATE | NLM_F_EXCL)

    def addresses(self, index: int) -> set[str]:
        found = set()
        for reply in self.request(RTM_GETADDR, IFADDRMSG.pack(0, 0, 0, 0, 0), NLM_F_DUMP):
            af, _, _, _, owner = IFADDRMSG.unpack_from(reply, 0)
            address = _attrs(reply, IFADDRMSG.size).get(IFA_ADDRESS)
            if owner == index and address is not None and af in (socket.AF_INET,
                                                                 socket.AF_INET6):
                found.add(socket.inet_ntop(af, bytes(address)))
        return found

    def add_neighbour(self, index: int, address: str, mac: str) -> None:
        family = family_of(address)
        self.request(RTM_NEWNEIGH, NDMSG.pack(_AF[family], index, NUD_PERMANENT, 0, 0)
                     + _attr(NDA_DST, socket.inet_pton(_AF[family], address))
                     + _attr(NDA_LLADDR, _mac(mac)), NLM_F_CREATE | NLM_F_EXCL)

    def add_default_route(self, index: int, family: int, gateway: str) -> None:
        self.request(RTM_NEWROUTE, RTMSG.pack(_AF[family], 0, 0, 0, RT_TABLE_MAIN,
                                              RTPROT_BOOT, 0, RTN_UNICAST, RTNH_F_ONLINK)
                     + _attr(RTA_GATEWAY, socket.inet_pton(_AF[family], gateway))
                     + _attr(RTA_OIF, U32.pack(index)), NLM_F_CREATE | NLM_F_EXCL)

    def has_default_route(self, index: int | None, family: int) -> bool:
        """A default route of `family` out of interface `index` (any, for None)."""
        for reply in self.request(RTM_GETROUTE, RTMSG.pack(_AF[family], 0, 0, 0, 0, 0, 0,
                                                           0, 0), NLM_F_DUMP):
            dst_len, table = reply[1], reply[4]
            oif = _attrs(reply, RTMSG.size).get(RTA_OIF)
            if dst_len == 0 and table == RT_TABLE_MAIN and (index is None or (
                    oif is not None and U32.unpack(oif)[0] == index)):
                return True
        return False


def _sysctl(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _random_mac() -> str:
    """A locally administered unicast MAC, as the kernel would pick for a veth."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return _mac_text(bytes(raw))


FORWARDING = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")


def enable_forwarding() -> list[str]:
    """Routing between containers and the fabric needs forwarding in this namespace.
    Returns the settings that were off (and are on now)."""
    changed = []
    for path in FORWARDING:
        try:
            with open(path) as fh:
                if fh.read().strip() == "1":
                    continue
            _sysctl(path, "1")
            changed.append(path.removeprefix("/proc/sys/").replace("/", "."))
        except OSError:  # IPv6 may be disabled on the host
            continue
    return changed


def connected_networks(addresses: Iterable[str]) -> list[str]:
    """The networks (`10.99.0.0/24`) of this namespace's interfaces that hold
    `addresses`; an address no interface holds is left out."""
    wanted = {ipaddress.ip_address(a) for a in addresses if a}
    found: list[str] = []
    with _Rtnl() as nl:
        for reply in nl.request(RTM_GETADDR, IFADDRMSG.pack(0, 0, 0, 0, 0), NLM_F_DUMP):
            af, length, _, _, _ = IFADDRMSG.unpack_from(reply, 0)
            attrs = _attrs(reply, IFADDRMSG.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None or af not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(bytes(raw))
            network = str(ipaddress.ip_interface(f"{ip}/{length}").network)
            if ip in wanted and network not in found:
                found.append(network)
    return found


def host_links(prefix: str = HOST_PREFIX) -> dict[str, int]:
    """Our host-side interfaces (name -> index) in this namespace."""
    with _Rtnl() as nl:
        return {link.name: link.index for link in nl.links() if link.name.startswith(prefix)}


def attach(netns_path: str, ifname: str, host_if: str, addresses: Sequence[str],
           mtu: int) -> Attachment:
    """Build the veth pair and wire both ends. On failure, remove what was made."""
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY)
    except OSError as exc:
        raise LinkError(f"network namespace {netns_path}: {exc.strerror}") from exc
    mac = _random_mac()
    try:
        with _Rtnl() as nl:
            try:
                try:
                    nl.add_veth(host_if, HOST_MAC, mtu, ifname, mac, ns_fd)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST or not _has_doomed(nl):
                        raise
                    # The name may be held by a pair a DEL detached and the reaper has
                    # not deleted yet (a sandbox re-made in the same namespace): delete
                    # those now, then try once more.
                    remove_doomed()
                    nl.add_veth(host_if, HOST_MAC, mtu, ifname, mac, ns_fd)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    raise LinkError(f"interface {ifname} already exists in {netns_path} "
                                    f"or {host_if} on the host") from exc
                raise LinkError(f"creating veth {host_if}/{ifname}: {exc}") from exc
            index = 0
            try:
                made = nl.link(host_if)
                if made is None:
                    raise LinkError(f"veth {host_if} vanished after it was created")
                index = made.index
                _configure_host_end(nl, host_if, index, addresses)
                _configure_container_end(netns_path, ifname, addresses)
            except BaseException:
                with contextlib.suppress(NetlinkError):
                    if index:
                        nl.delete_link(index)
                raise
    finally:
        os.close(ns_fd)
    return Attachment(host_if, index, mac)


def _configure_host_end(nl: _Rtnl, host_if: str, index: int,
                        addresses: Sequence[str]) -> None:
    families = {family_of(a) for a in addresses}
    try:
        if 4 in families:
            _sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp", "1")
            _sysctl(f"/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay", "0")
            _sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding", "1")
        if 6 in families:
            # No DAD: the container's first packets go to our link-local address at once.
            _sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/accept_dad", "0")
            _sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/accept_ra", "0")
            _sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/forwarding", "1")
    except OSError as exc:
        raise LinkError(f"sysctl on {host_if}: {exc.strerror}") from exc
    try:
        nl.set_link(index, up=True)
    except NetlinkError as exc:
        raise LinkError(f"setting {host_if} up: {exc}") from exc


def _configure_container_end(netns_path: str, ifname: str,
                             addresses: Sequence[str]) -> None:
    try:
        with entered(netns_path):
            nl = _Rtnl()
        with nl:
            link = nl.link(ifname)
            if link is None:
                raise LinkError(f"{ifname} is missing in {netns_path} after it was created")
            with contextlib.suppress(NetlinkError):
                nl.set_link(0, up=True, name="lo")
            for address in addresses:
                nl.add_address(link.index, address)
            nl.set_link(link.index, up=True)
            for family in sorted({family_of(a) for a in addresses}):
                nl.add_neighbour(link.index, GATEWAY[family], HOST_MAC)
                # The container's first interface of a family takes its default route;
                # a second one (eth1) is reached by its address (the host routes it).
                if not nl.has_default_route(None, family):
                    nl.add_default_route(link.index, family, GATEWAY[family])
    except NetnsError as exc:
        raise LinkError(str(exc)) from exc
    except (NetlinkError, OSError) as exc:
        raise LinkError(f"configuring {ifname} in {netns_path}: {exc}") from exc


# Errors that mean "already gone": DEL must succeed when things no longer exist, and
# must fail on anything else (a busy or forbidden link is not a success).
_GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.ENXIO)


@contextlib.contextmanager
def _unless_gone(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code in _GONE:
            return
        raise LinkError(f"{what}: {exc}") from exc


def same_namespace(netns_path: str) -> bool:
    """True when `netns_path` is this process's own network namespace (the host's)."""
    try:
        theirs, ours = os.stat(netns_path), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def detach(host_if: str) -> bool:
    """Remove the pair (by its host end); True when something was removed.

    Only the host end is ever looked for. A veth pair is made in one request, both ends
    at once, and deleting either end deletes both: with the host end gone there is no
    pair of ours left, and an `ifname` veth in the container's namespace belongs to
    another attachment (a runtime's DEL for an ADD that failed because that name was
    taken once deleted a live container's interface here).
    """
    with _Rtnl() as nl:
        found = nl.link(host_if)
        if found is not None:
            with _unless_gone(f"deleting {host_if}"):
                nl.delete_link(found.index)
                return True
    return False


def disable(host_if: str) -> bool:
    """Set the host end down (traffic stops) and mark it DOOMED for `remove_doomed`;
    False when there is no such interface. One request, by name."""
    with _Rtnl() as nl:
        try:
            nl.set_link(0, up=False, name=host_if, group=DOOMED)
        except NetlinkError as exc:
            if exc.code in _GONE:
                return False
            raise LinkError(f"setting {host_if} down: {exc}") from exc
    return True


def remove_doomed() -> None:
    """Delete every pair `disable` marked, with one request (one RCU grace period)."""
    with _Rtnl() as nl, _unless_gone("deleting detached veths"):
        nl.delete_link(0, group=DOOMED)


def _has_doomed(nl: _Rtnl) -> bool:
    return any(link.group == DOOMED for link in nl.links())


def remove(host_if: str, index: int) -> None:
    """Delete the pair by its host end, if that name still has this index."""
    with _Rtnl() as nl:
        found = nl.link(host_if)
        if found is not None and found.index == index:
            with _unless_gone(f"deleting {host_if}"):
                nl.delete_link(index)


def host_link_states(prefix: str = HOST_PREFIX) -> list[tuple[str, int, bool]]:
    """(name, index, administratively up) of our host-side interfaces."""
    with _Rtnl() as nl:
        return [(link.name, link.index, bool(link.flags & IFF_UP)) for link in nl.links()
                if link.name.startswith(prefix)]


def attachment_of(host_if: str, netns_path: str, ifname: str,
                  addresses: Sequence[str]) -> Attachment | None:
    """The attachment as `attach` made it, when it is all still there; else None."""
    if inspect(host_if, netns_path, ifname, addresses):
        return None
    try:
        with _Rtnl() as nl:
            host = nl.link(host_if)
        with entered(netns_path):
            nl = _Rtnl()
        with nl:
            container = nl.link(ifname)
    except (NetlinkError, NetnsError):
        return None
    if host is None or container is None:
        return None
    return Attachment(host_if, host.index, container.mac)


def inspect(host_if: str, netns_path: str, ifname: str,
            addresses: Sequence[str]) -> list[str]:
    """What is wrong with an attachment (empty when it is as `attach` made it)."""
    problems: list[str] = []
    with _Rtnl() as nl:
        host = nl.link(host_if)
        if host is None:
            return [f"host interface {host_if} is missing"]
        if host.operstate not in ("UP", "UNKNOWN"):
            problems.append(f"host interface {host_if} is {host.operstate}")
    try:
        with entered(netns_path):
            nl = _Rtnl()
    except NetnsError as exc:
        return [*problems, str(exc)]
    with nl:
        link = nl.link(ifname)
        if link is None:
            return [*problems, f"{ifname} is missing in {netns_path}"]
        have = nl.addresses(link.index)
        problems += [f"{ifname} lacks address {a}" for a in addresses if a not in have]
        for family in sorted({family_of(a) for a in addresses}):
            if not nl.has_default_route(None, family):
                problems.append(f"{netns_path} has no IPv{family} default route")
    return problems
