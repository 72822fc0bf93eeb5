"""How fabricctl prints: aligned tables for people, JSON for scripts.

Exit codes are shared by every command: 0 fine, 1 a problem was found (a check
failed, a peer is down), 2 usage or connection error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

OK = 0
PROBLEM = 1
ERROR = 2


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
