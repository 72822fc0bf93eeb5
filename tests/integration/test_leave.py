"""A node that leaves (its machine shuts down; fabric-agent.service sends SIGUSR2)
takes all of its routes with it at once, IPv4 and IPv6 alike, on a dual-stack lab."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import needs_root, running_lab
from tests.support.fabric import kernel_routes, wait_until

pytestmark = [needs_root, pytest.mark.root, pytest.mark.slow]


def test_a_dual_stack_node_that_leaves_withdraws_both_families_at_once():
    with running_lab(pool="10.244.0.0/16", pool6="fd00:244::/64", families=(4, 6)) as lab:
        for host in ("h1", "h2"):
            lab.add_host(host)
        for host in ("h1", "h2"):
            lab.wait_agent(host)
        lab.add_workload("h2")  # h2 gets a block of each family and announces both
        h2 = lab.state.hosts["h2"]
        ns = lab.state.hosts["h1"].netns

        def via_h2(family: int) -> list[str]:
            hop = h2.address if family == 4 else h2.address6
            return [p for p, how in kernel_routes(ns, family=family).items()
                    if f"via {hop} " in how + " "]

        for family in (4, 6):
            wait_until(lambda f=family: via_h2(f), f"h1 routes IPv{family} via h2", 30)
        lab.stop_agent("h2", sig=signal.SIGUSR2)
        for family in (4, 6):
            # Withdrawn: gone long before the restart time (120 s), or the hold time.
            wait_until(lambda f=family: not via_h2(f), f"h1 dropped h2's IPv{family} routes",
                       5)
