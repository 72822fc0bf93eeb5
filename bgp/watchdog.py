"""Is ExaBGP still answering? Pure.

A running ExaBGP can stop working without exiting: stopped (SIGSTOP, a debugger), or
stuck in a loop. Its peers notice when their hold timer runs out and drop our routes;
the agent would otherwise go on reporting it healthy. ExaBGP (with `api.ack`) answers
every command with `done` or `error`, in order, so the speaker counts what it sent and
what was answered, and when nothing at all has been answered for a while it sends a
probe (a `#` comment, answered `done` and doing nothing else).

ExaBGP is hung when a probe went out after its last answer and nothing was answered
for `patience` seconds since something was owed: a frozen idle ExaBGP is restarted
about `probe_every + patience` (10 s) after it froze, when its peers' hold timers (9 s)
have just dropped it too. Counting alone would not do: a command ExaBGP never answers (none
is known, but the count cannot prove it) would look like a hang forever after; here it
only costs a probe, which is answered.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE = "# l3fabric watchdog"


@dataclass
class ApiWatchdog:
    probe_every: float = 3.0  # seconds without an answer before asking for one
    patience: float = 7.0  # seconds owed an answer, none coming, a probe out: hung
    owed: int = 0  # commands sent and not answered yet
    last_answer: float = 0.0  # when ExaBGP last answered (or the connection came up)
    last_probe: float | None = None

    def connected(self, now: float) -> None:
        self.owed, self.last_answer, self.last_probe = 0, now, None

    def sent(self, commands: int, now: float) -> None:
        if self.owed == 0:
            self.last_answer = now  # nothing was owed: the wait starts now
        self.owed += commands

    def answered(self, now: float) -> None:
        self.owed = max(0, self.owed - 1)
        self.last_answer = now

    def probe_due(self, now: float) -> bool:
        quiet_since = max(self.last_answer, self.last_probe or 0.0)
        return now - quiet_since >= self.probe_every

    def probed(self, now: float) -> None:
        self.last_probe = now

    def hung(self, now: float) -> bool:
        return (self.last_probe is not None and self.last_probe >= self.last_answer
                and now - self.last_answer > self.patience)

    def deadline(self) -> float:
        """When `probe_due` or `hung` can next become true."""
        quiet_since = max(self.last_answer, self.last_probe or 0.0)
        return min(quiet_since + self.probe_every, self.last_answer + self.patience)
