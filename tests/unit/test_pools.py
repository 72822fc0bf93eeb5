import pytest

from fabric.model.pools import Pool, PoolError, check_overlap, parse_pool, pool_of


def test_defaults_per_family():
    assert parse_pool("a", "10.244.0.0/16").block_size == 26
    assert parse_pool("b", "fd00:10::/64").block_size == 122


@pytest.mark.parametrize(("cidr", "block", "message"), [
    ("10.244.0.0/33", None, "not a valid network"),
    ("banana", None, "not a valid network"),
    ("10.244.0.1/16", None, "host bits set; did you mean 10.244.0.0/16"),
    ("10.244.0.0/28", 26, "larger than the pool"),
    ("10.244.0.0/16", 19, "out of range for IPv4"),
    ("fd00::/64", 26, "out of range for IPv6"),
])
def test_bad_pools_say_why(cidr, block, message):
    with pytest.raises(PoolError, match=message):
        parse_pool("p", cidr, block)


def test_bad_name():
    with pytest.raises(PoolError, match="pool name"):
        parse_pool("Bad/Name", "10.0.0.0/24")


def test_overlap_names_the_other_pool():
    existing = [parse_pool("one", "10.244.0.0/16")]
    with pytest.raises(PoolError, match="overlaps pool 'one'"):
        check_overlap(parse_pool("two", "10.244.128.0/17"), existing)
    with pytest.raises(PoolError, match="already exists"):
        check_overlap(parse_pool("one", "10.245.0.0/16"), existing)
    check_overlap(parse_pool("three", "10.245.0.0/16"), existing)
    check_overlap(parse_pool("v6", "fd00::/64"), existing)


def test_record_round_trip():
    pool = parse_pool("p", "10.1.0.0/24", 28, nat_outgoing=True, strict_affinity=True)
    assert Pool.from_record(pool.to_record()) == pool


def test_pool_of():
    pools = [parse_pool("a", "10.1.0.0/24"), parse_pool("b", "fd00::/120")]
    assert pool_of("10.1.0.7", pools).name == "a"
    assert pool_of("fd00::5", pools).name == "b"
    assert pool_of("10.2.0.1", pools) is None


def test_underlay_conflicts_name_nodes_and_peers():
    from fabric.model.nodes import Node
    from fabric.model.peers import PeerSpec
    from fabric.model.pools import check_underlay, underlay_conflicts

    nodes = [Node("h1", "10.99.0.11", 64512), Node("h2", "10.98.0.12", 64512),
             Node("v6", "fd00:99::1", 64512), Node("broken", "not-an-ip", 64512)]
    peers = [PeerSpec("tor1", "10.99.0.254", 65000), PeerSpec("far", "192.0.2.1", 65000)]
    pool = parse_pool("underlay", "10.99.0.0/24")
    assert underlay_conflicts(pool, nodes, peers) == ["node h1 (10.99.0.11)",
                                                      "BGP peer tor1 (10.99.0.254)"]
    with pytest.raises(PoolError, match=r"overlaps node h1 \(10.99.0.11\), "
                                        r"BGP peer tor1 \(10.99.0.254\)"):
        check_underlay(pool, nodes, peers)
    check_underlay(parse_pool("ok", "10.244.0.0/16"), nodes, peers)
    assert underlay_conflicts(parse_pool("six", "fd00:99::/64"), nodes, peers) == [
        "node v6 (fd00:99::1)"]


def test_a_pool_inside_a_nodes_underlay_network_or_over_etcd_is_refused():
    """10.99.0.192/26 holds no node address but the segment's gateway and etcd
    (10.99.0.254): one ADD from it took etcd away from the whole fabric."""
    from fabric.model.nodes import Node
    from fabric.model.pools import check_underlay, underlay_conflicts

    nodes = [Node("h1", "10.99.0.11", 64512, networks=("10.99.0.0/24", "fd99::/64"))]
    edge = parse_pool("edge", "10.99.0.192/26")
    assert underlay_conflicts(edge, nodes, []) == ["node h1's underlay network 10.99.0.0/24"]
    with pytest.raises(PoolError, match=r"underlay network 10\.99\.0\.0/24"):
        check_underlay(edge, nodes, [])
    far = parse_pool("far", "10.50.0.0/16")
    assert underlay_conflicts(far, [], [], [("etcd endpoint 10.50.0.1", "10.50.0.1")]) == [
        "etcd endpoint 10.50.0.1 (10.50.0.1)"]
    assert underlay_conflicts(parse_pool("ok", "10.244.0.0/16"), nodes, []) == []


def test_names_with_a_trailing_newline_are_refused():
    with pytest.raises(PoolError, match="pool name"):
        parse_pool("p\n", "10.0.0.0/24")


@pytest.mark.parametrize("cidr,why", [
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "169.254.1.1"),
    ("224.0.0.0/4", "multicast"), ("fe80::/10", "link-local"), ("::/0", "every address"),
    ("0.0.0.0/0", "every address"), ("240.0.0.0/8", "reserved"), ("ff02::/16", "multicast"),
    ("127.0.0.0/26", "loopback"),
])
def test_pools_over_addresses_containers_cannot_use_are_refused(cidr, why):
    with pytest.raises(PoolError, match=why):
        parse_pool("p", cidr)


def test_ordinary_private_and_documentation_pools_are_fine():
    for cidr in ("10.244.0.0/16", "192.168.0.0/16", "172.16.0.0/12", "fd00:244::/64",
                 "100.64.0.0/10", "2001:db8::/48"):
        parse_pool("p", cidr)
