"""The RIB: selection, ECMP, graceful restart, re-evaluation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bgp.rib import Path, Rib
from fabric.model.prefix import Prefix

P = Prefix.parse("10.244.1.0/26")


def test_shortest_path_then_lowest_peer():
    rib = Rib()
    rib.announce("192.0.2.9", P, Path("192.0.2.9", "192.0.2.9", (65001,)))
    rib.announce("192.0.2.3", P, Path("192.0.2.3", "192.0.2.3", (65001, 65002)))
    assert rib.next_hops(P) == ("192.0.2.9",)
    rib.announce("192.0.2.10", P, Path("192.0.2.10", "192.0.2.10", (65003,)))
    assert rib.next_hops(P) == ("192.0.2.9",)  # .9 < .10 numerically, not as text
    assert rib.withdraw("192.0.2.9", P)
    assert rib.next_hops(P) == ("192.0.2.10",)


def test_ecmp_uses_every_equal_path():
    rib = Rib(ecmp=True)
    for peer in ("192.0.2.1", "192.0.2.2"):
        rib.announce(peer, P, Path(peer, peer, (65001,)))
    rib.announce("192.0.2.3", P, Path("192.0.2.3", "192.0.2.3", (65001, 65002)))
    assert rib.next_hops(P) == ("192.0.2.1", "192.0.2.2")


def test_rejected_paths_are_kept_but_never_chosen():
    rib = Rib()
    assert not rib.announce("192.0.2.1", P, Path("192.0.2.1", "192.0.2.1", (), "own-block"))
    assert rib.next_hops(P) == ()
    assert rib.counts("192.0.2.1") == {"received": 1, "accepted": 0, "rejected": 1}
    changed = rib.reevaluate(lambda prefix, path: None)
    assert changed == {P} and rib.next_hops(P) == ("192.0.2.1",)


def test_graceful_restart_keeps_then_sweeps():
    rib = Rib()
    q = Prefix.parse("10.244.1.64/26")
    rib.announce("192.0.2.1", P, Path("192.0.2.1", "192.0.2.1"))
    rib.announce("192.0.2.1", q, Path("192.0.2.1", "192.0.2.1"))
    assert rib.mark_stale("192.0.2.1") == {P, q}
    assert rib.next_hops(P) == ("192.0.2.1",)  # still forwarding
    assert all(path.stale for path in rib.best(P))  # what is shown as best is stale
    rib.announce("192.0.2.1", P, Path("192.0.2.1", "192.0.2.1"))  # re-sent: fresh
    assert rib.sweep_stale("192.0.2.1") == {q}
    assert rib.next_hops(P) == ("192.0.2.1",) and rib.next_hops(q) == ()


def test_drop_peer():
    rib = Rib()
    rib.announce("192.0.2.1", P, Path("192.0.2.1", "192.0.2.1"))
    assert rib.drop_peer("192.0.2.1") == {P}
    assert list(rib.selected_prefixes()) == [] and len(rib) == 0


ops = st.lists(st.tuples(st.sampled_from(["a", "w", "d"]), st.integers(1, 4),
                         st.integers(0, 3), st.integers(0, 2)), max_size=40)


@given(ops)
def test_selection_always_matches_a_fresh_computation(sequence):
    rib = Rib()
    prefixes = [Prefix.parse(f"10.244.{i}.0/26") for i in range(4)]
    for op, peer_n, prefix_n, length in sequence:
        peer = f"192.0.2.{peer_n}"
        prefix = prefixes[prefix_n]
        if op == "a":
            rib.announce(peer, prefix, Path(peer, peer, tuple(range(length))))
        elif op == "w":
            rib.withdraw(peer, prefix)
        else:
            rib.drop_peer(peer)
    for prefix in prefixes:
        paths = list(rib.paths_of(prefix).values())
        if not paths:
            assert rib.best(prefix) == ()
            continue
        best = min(paths, key=lambda p: (len(p.as_path), int(p.peer.rsplit(".", 1)[1])))
        assert rib.best(prefix) == (best,)
