"""A configured BGP peer may not take a node's own address (pure check)."""

from __future__ import annotations

import pytest

from fabric.model.nodes import Node
from fabric.model.peers import PeerError, check_not_a_node, parse_peer

NODES = [Node("h1", "10.99.0.11", 64512), Node("h2", "fd00:99::2", 64512)]


def test_a_peer_at_a_node_address_is_refused_naming_the_node():
    with pytest.raises(PeerError, match=r"10\.99\.0\.11 is the address of node h1"):
        check_not_a_node(parse_peer("x", "10.99.0.11", 65000), NODES)
    # The same address spelled differently is the same address.
    with pytest.raises(PeerError, match="node h2"):
        check_not_a_node(parse_peer("y", "fd00:99:0::2", 65000), NODES)


def test_other_addresses_pass():
    check_not_a_node(parse_peer("tor1", "10.99.0.254", 65000), NODES)
    check_not_a_node(parse_peer("tor1", "10.99.0.11", 65000), [Node("h3", "garbage", 1)])


def test_peer_names_with_a_trailing_newline_are_refused():
    with pytest.raises(PeerError, match="peer name"):
        parse_peer("tor1\n", "10.99.0.254", 65000)
