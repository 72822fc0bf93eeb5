"""The etcd adapter against a real etcd: listings larger than one gRPC reply, and a
mirror that keeps the last readable value of a record made unreadable."""

from __future__ import annotations

import threading

from fabric.store.datastore import PAGE
from fabric.store.keys import ROOT
from fabric.store.watch import Mirror
from tests.support.fabric import wait_until

PREFIX = f"{ROOT}test-list/"


def test_a_listing_over_grpcs_4_mib_reply_limit_is_read_whole(store):
    payload = "x" * 2000
    count = 2600  # 2600 x 2 KB: 5.2 MB, over gRPC's default 4 MiB reply
    for start in range(0, count, 100):
        for index in range(start, start + 100):
            store.put(f"{PREFIX}{index:05d}", {"v": 1, "n": index, "pad": payload})
    calls = []
    real = store._client.get_range_response
    store._client.get_range_response = lambda *a, **k: calls.append(k) or real(*a, **k)
    try:
        listing = store.list(PREFIX)
    finally:
        store._client.get_range_response = real
    assert [e.value["n"] for e in listing.entries] == list(range(count))
    assert len(calls) == -(-count // PAGE) and all(k["limit"] == PAGE for k in calls)
    assert len(store.keys(PREFIX)) == count


def test_pages_read_one_revision_even_while_keys_change(store):
    for index in range(3 * PAGE):
        store.put(f"{PREFIX}{index:05d}", {"v": 1, "n": index})
    stop = threading.Event()

    def writer() -> None:  # keys added behind the pages while they are read
        index = 3 * PAGE
        while not stop.is_set():
            store.put(f"{PREFIX}{index:05d}", {"v": 1, "n": index})
            index += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(5):
            listing = store.list(PREFIX)
            newest = max(e.mod_revision for e in listing.entries)
            assert newest <= listing.revision  # nothing from after the first page
            numbers = [e.value["n"] for e in listing.entries]
            assert numbers == list(range(len(numbers)))  # no gap, no repeat
    finally:
        stop.set()
        thread.join()


def test_a_record_made_unreadable_keeps_its_last_readable_value(store, etcd_server):
    seen: list[tuple[dict, dict]] = []
    key = f"{PREFIX}node"
    store.put(key, {"v": 1, "name": "b"})
    mirror = Mirror(store, PREFIX, lambda records, bad: seen.append((records, bad)), "test")
    mirror.start()
    try:
        wait_until(lambda: seen, "the first listing")
        store._client.put(key, b"garbage{")  # not JSON: as written by hand with etcdctl
        wait_until(lambda: seen[-1][1], "the unreadable value reported")
        records, unreadable = seen[-1]
        assert records[key] == {"name": "b"}  # not taken for a deletion
        assert "not JSON" in unreadable[key]
        store.put(key, {"v": 1, "name": "b2"})
        wait_until(lambda: not seen[-1][1], "readable again")
        assert seen[-1][0][key]["name"] == "b2"
        store.delete(key)
        wait_until(lambda: key not in seen[-1][0], "a real deletion")
    finally:
        mirror.stop()
