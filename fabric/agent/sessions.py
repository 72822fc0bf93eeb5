"""One BGP session as the agent tracks it, and the names people read for its errors. Pure.

ExaBGP reports a session as connected/up/down; the agent adds what it decided about
it: graceful-restart deadline for its routes, a max-prefix hold-down, counters. The
deadlines are on the agent's monotonic clock (`fabric.agent.clock`); `since` is wall
time, for display.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from bgp.peers import Peer

STATE_NAMES = {"connected": "OpenSent", "up": "Established", "down": "Active"}


@dataclass
class Session:
    peer: Peer
    since: float  # wall clock, when `state` last changed
    state: str = "Idle"
    last_error: str = ""
    restart_time: int | None = None  # the peer's graceful-restart time, from its OPEN
    router_id: str = ""
    eor: bool = False
    stale_until: float | None = None  # monotonic: its stale routes go then
    held_down_until: float | None = None  # monotonic: max-prefix hold-down ends then
    rejected: Counter[str] = field(default_factory=Counter)  # cumulative, by reason
    flaps: int = 0

    @property
    def established(self) -> bool:
        return self.state == "Established"


def describe_reason(reason: str) -> str:
    """ExaBGP's "notification sent (4,0)" with the names of the code and subcode."""
    match = re.search(r"\((\d+),(\d+)\)", reason)
    if "notification" in reason and match:
        return f"{reason} {notification_text(int(match[1]), int(match[2]))}"
    return reason


def notification_text(code: int, subcode: int) -> str:
    names = {1: "Message Header Error", 2: "OPEN Message Error", 3: "UPDATE Message Error",
             4: "Hold Timer Expired", 5: "FSM Error", 6: "Cease"}
    cease = {1: "Maximum Number of Prefixes Reached", 2: "Administrative Shutdown",
             3: "Peer De-configured", 4: "Administrative Reset", 5: "Connection Rejected",
             6: "Other Configuration Change", 7: "Connection Collision Resolution"}
    text = names.get(code, "error")
    if code == 6 and subcode in cease:
        text += f" / {cease[subcode]}"
    return text
