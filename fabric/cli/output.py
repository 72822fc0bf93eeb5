"""How fabricctl prints: aligned tables for people, JSON for scripts.

Exit codes are shared by every command: 0 fine, 1 a problem was found (a check
failed, a peer is down) or fabricctl itself failed, 2 usage or connection error, 141
(128 + SIGPIPE, as coreutils) when the reader of the output went away (`| head -1`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO, cast

OK = 0
PROBLEM = 1
ERROR = 2
CLOSED = 141  # what a shell reports for a writer killed by SIGPIPE


class CliError(Exception):
    """A one-line error for the user; exit status 2 unless given."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None
          ) -> None:
    out = out or sys.stdout
    text_rows = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), file=out)
    for row in text_rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def emit_json(value: Any, out: TextIO | None = None) -> None:
    json.dump(value, out or sys.stdout, indent=2, sort_keys=True, default=str)
    print(file=out or sys.stdout)


def kv(pairs: Iterable[tuple[str, Any]], out: TextIO | None = None) -> None:
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}} {value}", file=out or sys.stdout)


class OutputClosed(Exception):
    """Whoever read our stdout went away. Kept apart from BrokenPipeError because a
    broken pipe also comes from a socket to an agent that died, which is an error the
    user must see, while a closed stdout must end the command quietly."""


class _GuardedStream:
    """sys.stdout, with a closed reader reported as OutputClosed (see above)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guard_stdout() -> TextIO:
    """Wrap sys.stdout (returns the original, to put back)."""
    original = sys.stdout
    if not isinstance(original, _GuardedStream):
        sys.stdout = cast(TextIO, _GuardedStream(original))
    return original


def silence(*streams: TextIO) -> None:
    """Point closed streams at /dev/null, as the Python docs recommend for SIGPIPE:
    the interpreter flushes stdout once more at exit, and that flush would otherwise
    print "Exception ignored ... BrokenPipeError" after we chose to exit quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in streams:
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):  # not a real file (a test's capture buffer)
                continue
    finally:
        os.close(devnull)
