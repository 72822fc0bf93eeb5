"""A worker process for the IPAM stress test: allocates and releases at random.

It journals intent and completion of every step (`A` allocate, `W` register, `D`
deregister, `R` release; `+` before, `=` after)
so the test can tell, after a SIGKILL, which handles it may or must still hold.
On SIGTERM it cleans up everything it holds and exits 0.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

from fabric.model.handles import Exhausted
from fabric.model.nodes import Workload
from fabric.settings import EtcdSettings, parse_endpoints
from fabric.store.datastore import Datastore
from fabric.store.registry import Registry
from ipam.allocator import Ipam


def main() -> None:
    endpoint, node, worker, journal_path, seed = sys.argv[1:6]
    rng = random.Random(int(seed))
    store = Datastore.connect(EtcdSettings(endpoints=parse_endpoints(endpoint)))
    ipam, registry = Ipam(store, rng=rng), Registry(store)
    fd = os.open(journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stopping = False

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    held: list[str] = []
    counter = 0

    def release(handle: str) -> None:
        note(f"D+ {handle}")
        registry.deregister_workload(node, handle)
        note(f"D= {handle}")
        note(f"R+ {handle}")
        ipam.release(handle)
        note(f"R= {handle}")

    note("ready")
    while not stopping:
        if len(held) < 5 and (not held or rng.random() < 0.6):
            counter += 1
            handle = f"{node}-w{worker}-{counter}.eth0"
            note(f"A+ {handle}")
            try:
                record = ipam.allocate(handle, node)
            except Exhausted:
                note(f"X {handle}")
                time.sleep(0.01)
                continue
            address = record.allocations[0].address
            note(f"A= {handle} {address}")
            note(f"W+ {handle}")
            registry.register_workload(Workload(handle, node, handle, "eth0",
                                                f"/run/netns/{handle}", (address,)))
            note(f"W= {handle}")
            held.append(handle)
        else:
            release(held.pop(rng.randrange(len(held))))
    for handle in held:
        release(handle)
    note("clean-exit")
    os.close(fd)


if __name__ == "__main__":
    main()
