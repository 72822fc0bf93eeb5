"""structlog set-up, done once per process.

Daemons log JSON lines (one event per line, machine-readable, with the bound context
such as node, peer, prefix, handle); the CLI logs readable lines to stderr so its
stdout stays clean for tables and `-o json`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

Mode = Literal["json", "console"]


def configure(mode: Mode = "json", level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if mode == "json":
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str, **context: object) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name and any extra context."""
    return structlog.get_logger().bind(component=name, **context)
