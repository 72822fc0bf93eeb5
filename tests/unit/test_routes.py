"""The kernel route model and the pure diff."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.kernel import netlink
from fabric.kernel.routes import Route, blackhole, diff, kind_of, remote, workload
from fabric.model.prefix import Prefix


def test_prefix_parse_and_print():
    p = Prefix.parse("10.244.1.64/26")
    assert (p.family, p.length, str(p)) == (4, 26, "10.244.1.64/26")
    assert str(Prefix.parse("fd00:1::/64")) == "fd00:1::/64"
    assert Prefix.parse("10.0.0.1") == Prefix.parse("10.0.0.1/32")
    for bad, why in (("10.0.0.1/24", "host bits"), ("nope/24", "not an IP prefix"),
                     ("10.0.0.0/33", "prefix length")):
        with pytest.raises(ValueError, match=why):
            Prefix.parse(bad)


@given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1),
       st.integers(0, 32))
def test_contains_matches_ipaddress(a, la, b, lb):
    na = ipaddress.ip_network((a, la), strict=False)
    nb = ipaddress.ip_network((b, lb), strict=False)
    pa, pb = Prefix.parse(str(na)), Prefix.parse(str(nb))
    assert pa.contains(pb) == nb.subnet_of(na)
    assert pa.overlaps(pb) == na.overlaps(nb)


def test_diff_replaces_changed_deletes_unwanted_keeps_stale():
    a, b, c, d = (Prefix.parse(f"10.0.{i}.0/24") for i in range(4))
    desired = {a: remote(a, ["192.0.2.1"]), b: blackhole(b), c: workload(c, 7)}
    actual = {a: remote(a, ["192.0.2.9"]), b: blackhole(b), d: remote(d, ["192.0.2.1"])}
    change = diff(desired, actual)
    assert {r.prefix for r in change.replace} == {a, c}
    assert [r.prefix for r in change.delete] == [d]
    assert diff(desired, actual, keep=[d]).delete == []


def test_kind_is_not_compared_but_shown():
    p = Prefix.parse("10.0.0.5/32")
    assert remote(p, ["192.0.2.1"], "borrowed") == remote(p, ["192.0.2.1"], "remote")
    assert kind_of(Route(p, "unicast", ("192.0.2.1",))) == "borrowed"
    assert kind_of(Route(p, "unicast", (), 4)) == "workload"
    assert kind_of(blackhole(Prefix.parse("10.0.0.0/26"))) == "blackhole"


@pytest.mark.parametrize("route", [
    remote(Prefix.parse("10.1.0.0/26"), ["192.0.2.1"]),
    remote(Prefix.parse("10.1.0.0/26"), ["192.0.2.2", "192.0.2.1"]),
    blackhole(Prefix.parse("10.1.0.64/26")),
    workload(Prefix.parse("10.1.0.7/32"), 12),
    remote(Prefix.parse("fd00:1::/122"), ["fd00::1"]),
])
def test_netlink_encoding_round_trips(route):
    message = netlink.encode_route(route, seq=5, protocol=73)
    (msg,) = list(netlink.split(message))
    assert (msg.type, msg.seq) == (netlink.RTM_NEWROUTE, 5)
    decoded, protocol, table = netlink.decode_route(msg.payload)
    assert decoded == route and protocol == 73 and table == netlink.RT_TABLE_MAIN


def test_teardown_tolerates_only_not_found():
    """DEL succeeds when things are gone, and fails on anything else (busy, forbidden)."""
    import errno

    from fabric.kernel import links
    from fabric.kernel.netlink import NetlinkError

    for gone in (errno.ENODEV, errno.ENOENT, errno.ESRCH):
        with links._unless_gone("deleting x"):
            raise NetlinkError(gone)
    for real in (errno.EBUSY, errno.EPERM):
        try:
            with links._unless_gone("deleting x"):
                raise NetlinkError(real)
        except links.LinkError as exc:
            assert "deleting x" in str(exc)
        else:
            raise AssertionError(f"errno {real} was swallowed")


def test_deletes_match_any_scope():
    """A delete says scope "nowhere" (any): with "universe" the kernel found no
    link-scope route to delete (a workload's /32) and said ESRCH, taken as "gone"."""
    from fabric.kernel.netlink import NLMSGHDR, RT_SCOPE_NOWHERE, RTMSG, encode_route
    from fabric.kernel.routes import workload

    message = encode_route(workload(Prefix.parse("10.244.0.5/32"), 7), 1, 73, delete=True)
    fields = RTMSG.unpack_from(message, NLMSGHDR.size)
    assert fields[6] == RT_SCOPE_NOWHERE
