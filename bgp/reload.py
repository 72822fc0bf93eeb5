"""When to tell ExaBGP to reload its configuration, and when to tell it again. Pure.

Two facts of ExaBGP 5.0.15 shape this (both reproduced against the real process):

* A SIGUSR1 that arrives before ExaBGP has installed its signal handlers kills it
  (exit -10 when signalled 0.05 s and 0.2 s after start). So a reload is asked for
  through the API (`reload`), which only exists once ExaBGP runs our API process: a
  request made before that is remembered and sent when the API connects.
* A reload is silently dropped when ExaBGP still has updates queued for a peer
  (`reactor/loop.py`: the signal is cleared, then `_pending_adjribout()` skips it).
  So a reload counts as done only when ExaBGP logs "loaded new configuration
  successfully"; without that within `retry` seconds it is asked again (doubling up
  to `max_retry`). A reload that ExaBGP refuses (a bad file) is not retried: it
  leaves ExaBGP 5.0.15 refusing every later reload, even of a valid file, so the
  speaker restarts ExaBGP instead (a new process reads the file as it is then).

A new ExaBGP process reads the file itself; if the file changed after the process was
started, it may have read either version, so it is reloaded once its API is up.
"""

from __future__ import annotations

from dataclasses import dataclass

CONFIRMED = "loaded new configuration successfully"
REFUSED = "could not load/reload configuration"


@dataclass
class ReloadGate:
    retry: float = 1.0
    max_retry: float = 8.0
    connected: bool = False
    wanted: bool = False  # the file changed since ExaBGP last read it
    sent_at: float | None = None  # a reload is in flight since then
    again: bool = False  # the file changed while a reload was in flight
    backoff: float = 0.0

    def spawned(self) -> None:
        """A new process: it reads the file as it is now."""
        self.connected = False
        self.wanted = self.again = False
        self.sent_at = None

    def request(self, now: float) -> bool:
        """The file changed. True when `reload` must be sent now."""
        if self.sent_at is not None:
            self.again = True
            return False
        self.wanted = True
        return self._send(now)

    def api_connected(self, now: float) -> bool:
        self.connected = True
        return self._send(now)

    def api_lost(self) -> None:
        self.connected = False
        if self.sent_at is not None:  # unconfirmed: ask the next connection again
            self.sent_at = None
            self.wanted = True

    def log_line(self, line: str, now: float) -> tuple[bool | None, bool]:
        """(outcome of an in-flight reload or None, whether to send `reload` now)."""
        if self.sent_at is None:
            return None, False  # ExaBGP's own start-up load, not ours
        if CONFIRMED in line:
            self.sent_at = None
            self.backoff = 0.0
            if self.again:
                self.again, self.wanted = False, True
                return True, self._send(now)
            return True, False
        if REFUSED in line:
            self.sent_at = None
            self.backoff = 0.0
            self.again = False
            return False, False
        return None, False

    def deadline(self) -> float | None:
        if self.sent_at is None:
            return None
        return self.sent_at + (self.backoff or self.retry)

    def poll(self, now: float) -> bool:
        """True when an unconfirmed reload must be sent again."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return False
        self.backoff = min((self.backoff or self.retry) * 2, self.max_retry)
        self.sent_at = now
        return True

    def _send(self, now: float) -> bool:
        if not (self.wanted and self.connected):
            return False
        self.wanted = False
        self.sent_at = now
        return True
