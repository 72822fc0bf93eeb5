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
moving a link between namespaces (that serialises on the kernel's rtnl lock).

pyroute2 is used here: these are a handful of messages per container. Routes of our
protocol are not written here; the agent (`fabric.kernel.writer`, fed by its owner loop) owns them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from fabric.kernel.netns import NetnsError, entered

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY = {4: "169.254.1.1", 6: "fe80::ecee:eeff:feee:eeee"}
HOST_PREFIX = "l3f"
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
IFA_F_NODAD = 0x02


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


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _sysctl(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def enable_forwarding() -> None:
    """Routing between containers and the fabric needs forwarding in this namespace."""
    _sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    with contextlib.suppress(OSError):  # IPv6 may be disabled on the host
        _sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def host_links(prefix: str = HOST_PREFIX) -> dict[str, int]:
    """Our host-side interfaces (name -> index) in this namespace."""
    with _ipr() as ipr:
        return {link.get("IFLA_IFNAME"): link["index"] for link in ipr.get_links()
                if str(link.get("IFLA_IFNAME", "")).startswith(prefix)}


def attach(netns_path: str, ifname: str, host_if: str, addresses: Sequence[str],
           mtu: int) -> Attachment:
    """Build the veth pair and wire both ends. On failure, remove what was made."""
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY)
    except OSError as exc:
        raise LinkError(f"network namespace {netns_path}: {exc.strerror}") from exc
    try:
        with _ipr() as ipr:
            try:
                ipr.link("add", ifname=host_if, kind="veth", address=HOST_MAC, mtu=mtu,
                         peer={"ifname": ifname, "net_ns_fd": ns_fd, "mtu": mtu})
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    raise LinkError(f"interface {ifname} already exists in {netns_path} "
                                    f"or {host_if} on the host") from exc
                raise LinkError(f"creating veth {host_if}/{ifname}: {exc}") from exc
            try:
                index = ipr.link_lookup(ifname=host_if)[0]
                _configure_host_end(ipr, host_if, index, addresses)
                mac = _configure_container_end(netns_path, ifname, addresses)
            except BaseException:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=ipr.link_lookup(ifname=host_if)[0])
                raise
    finally:
        os.close(ns_fd)
    return Attachment(host_if, index, mac)


def _configure_host_end(ipr: IPRoute, host_if: str, index: int,
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
        ipr.link("set", index=index, state="up")
    except NetlinkError as exc:
        raise LinkError(f"setting {host_if} up: {exc}") from exc


def _configure_container_end(netns_path: str, ifname: str,
                             addresses: Sequence[str]) -> str:
    try:
        with entered(netns_path), _ipr() as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            with contextlib.suppress(IndexError, NetlinkError):
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for address in addresses:
                family = family_of(address)
                ipr.addr("add", index=index, address=address,
                         prefixlen=128 if family == 6 else 32,
                         **({"flags": IFA_F_NODAD} if family == 6 else {}))
            ipr.link("set", index=index, state="up")
            for family in sorted({family_of(a) for a in addresses}):
                gateway = GATEWAY[family]
                ipr.neigh("add", dst=gateway, lladdr=HOST_MAC, ifindex=index,
                          state=NUD_PERMANENT)
                ipr.route("add", dst="::/0" if family == 6 else "0.0.0.0/0",
                          gateway=gateway, oif=index, flags=RTNH_F_ONLINK, proto=3)
            link = ipr.get_links(index)[0]
            return str(link.get("IFLA_ADDRESS", ""))
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


def detach(host_if: str, netns_path: str | None, ifname: str) -> bool:
    """Remove the pair; True when something was removed. Missing pieces are fine.

    The container end is looked for by name only inside a namespace that is not the
    host's own, and only if it is a veth: a runtime's bad CNI_NETNS must never make us
    delete one of the host's interfaces.
    """
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if found:
            with _unless_gone(f"deleting {host_if}"):
                ipr.link("del", index=found[0])
                return True
    if not netns_path or not os.path.exists(netns_path) or same_namespace(netns_path):
        return False
    # The host end is gone but a half-made container end may be left.
    try:
        with entered(netns_path), _ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return False
            info = ipr.get_links(found[0])[0]
            if info.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "veth":
                return False
            with _unless_gone(f"deleting {ifname} in {netns_path}"):
                ipr.link("del", index=found[0])
                return True
    except NetnsError:
        return False  # the namespace went away meanwhile: nothing left to remove
    return False


def disable(host_if: str) -> int | None:
    """Set the host end down (traffic stops) and return its index for `remove`; None
    when there is no such interface."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if not found:
            return None
        with _unless_gone(f"setting {host_if} down"):
            ipr.link("set", index=found[0], state="down")
        return found[0]


def remove(host_if: str, index: int) -> None:
    """Delete the pair by its host end, if that name still has this index.

    This is the slow part of a detach (the kernel waits an RCU grace period, about
    20 ms), which is why the CNI handler runs it in the background after `disable`.
    """
    with _ipr() as ipr:
        if ipr.link_lookup(ifname=host_if) == [index]:
            with _unless_gone(f"deleting {host_if}"):
                ipr.link("del", index=index)


def host_link_states(prefix: str = HOST_PREFIX) -> list[tuple[str, int, bool]]:
    """(name, index, administratively up) of our host-side interfaces."""
    with _ipr() as ipr:
        return [(str(link.get("IFLA_IFNAME")), int(link["index"]), bool(link["flags"] & 1))
                for link in ipr.get_links()
                if str(link.get("IFLA_IFNAME", "")).startswith(prefix)]


def attachment_of(host_if: str, netns_path: str, ifname: str,
                  addresses: Sequence[str]) -> Attachment | None:
    """The attachment as `attach` made it, when it is all still there; else None."""
    if inspect(host_if, netns_path, ifname, addresses):
        return None
    try:
        with _ipr() as ipr:
            index = ipr.link_lookup(ifname=host_if)[0]
        with entered(netns_path), _ipr() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return Attachment(host_if, index, str(link.get("IFLA_ADDRESS", "")))
    except (IndexError, NetlinkError, NetnsError):
        return None


def inspect(host_if: str, netns_path: str, ifname: str,
            addresses: Sequence[str]) -> list[str]:
    """What is wrong with an attachment (empty when it is as `attach` made it)."""
    problems: list[str] = []
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if not found:
            return [f"host interface {host_if} is missing"]
        link = ipr.get_links(found[0])[0]
        if link.get("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            problems.append(f"host interface {host_if} is {link.get('IFLA_OPERSTATE')}")
    try:
        with entered(netns_path), _ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return [*problems, f"{ifname} is missing in {netns_path}"]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=found[0])}
            problems += [f"{ifname} lacks address {a}" for a in addresses if a not in have]
            for family in sorted({family_of(a) for a in addresses}):
                defaults = [r for r in ipr.get_routes(family=10 if family == 6 else 2)
                            if r["dst_len"] == 0 and r.get_attr("RTA_OIF") == found[0]]
                if not defaults:
                    problems.append(f"{ifname} has no IPv{family} default route")
    except NetnsError as exc:
        problems.append(str(exc))
    return problems
