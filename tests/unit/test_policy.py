"""Import policy: every reason, and what is accepted."""

from __future__ import annotations

import pytest

from bgp import policy
from bgp.policy import Origin, PolicyContext, evaluate
from fabric.model.prefix import Prefix

NODE_B = Origin("b", "192.0.2.2", 64512)
NODE_R = Origin("r", "192.0.2.3", 65003)
CTX = PolicyContext.build(
    64512, pools=[("10.244.0.0/16", 26)], own_blocks=["10.244.0.0/26"],
    underlay=["192.0.2.1", "192.0.2.2", "10.244.200.1"],
    blocks={"10.244.0.64/26": NODE_B, "10.244.0.128/26": NODE_R, "10.244.0.0/26":
            Origin("a", "192.0.2.1", 64512)},
    borrowed={"10.244.0.9/32": NODE_B})


@pytest.mark.parametrize("prefix, next_hop, path, reason", [
    ("0.0.0.0/0", "192.0.2.2", (), policy.DEFAULT_ROUTE),
    ("172.16.0.0/24", "192.0.2.2", (), policy.OUTSIDE_POOLS),
    ("10.244.200.0/24", "192.0.2.2", (), policy.UNDERLAY),
    ("10.244.1.0/26", "192.0.2.2", (65001, 64512), policy.AS_LOOP),
    ("10.244.0.0/26", "192.0.2.2", (), policy.OWN_BLOCK),
    ("10.244.0.0/24", "192.0.2.2", (), policy.OWN_BLOCK),
    ("10.244.0.70/32", "192.0.2.2", (), policy.NOT_BORROWED),
    ("10.244.0.64/26", "192.0.2.66", (), policy.NEXT_HOP),
    ("10.244.0.128/26", "192.0.2.66", (65099,), policy.ORIGIN),
])
def test_rejections(prefix, next_hop, path, reason):
    assert evaluate(Prefix.parse(prefix), next_hop, path, CTX) == reason


@pytest.mark.parametrize("prefix, next_hop, path", [
    ("10.244.0.64/26", "192.0.2.2", ()),  # node b's block from node b (iBGP)
    ("10.244.0.128/26", "192.0.2.254", (65100, 65003)),  # via a ToR, from r's AS
    ("10.244.0.9/32", "192.0.2.2", ()),  # borrowed from our block by b: we must route it
    ("10.244.9.0/26", "192.0.2.77", (65100,)),  # not claimed (yet): inside a pool, fine
])
def test_accepted(prefix, next_hop, path):
    assert evaluate(Prefix.parse(prefix), next_hop, path, CTX) is None
