"""structlog configuration: JSON lines for machines, readable lines for people.

Logs go to standard error, so that the ``stdout`` adapter's records on standard
output stay a clean JSON-lines stream. JSON when stderr is not a terminal.

The libraries underneath (psycopg, aiokafka, pika, httpx) log through the standard
``logging`` module. Left alone, Python prints their warnings raw on stderr (its
"last resort" handler), which breaks a JSON-lines stream for whoever parses it; so their
records go through the same renderer, warnings and above.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: str = "info", *, json: bool | None = None) -> None:
    use_json = (not sys.stderr.isatty()) if json is None else json
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line, its newline included (print() makes two): a library's
        # line from another thread (librdkafka's log callback) never lands inside ours.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(renderer)


class _LibraryHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it and leaves others' handlers alone."""


def _route_stdlib_logging(renderer: Any) -> None:
    handler = _LibraryHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _LibraryHandler)] + [handler]
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
