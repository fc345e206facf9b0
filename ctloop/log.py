"""Structured (JSON-lines) logging shared by every ctloop process.

``bind(volume_id=..., event_id=...)`` puts identifiers in every line logged inside the ``with``
block, so a line can always be traced back to the event, volume or model version it concerns.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("ctloop_log_context")
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_context.get({}))
        line.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send JSON lines to stderr; safe to call more than once."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    # Clients that log every connection or request at INFO, and Alembic, which logs its plugins,
    # its dialect and each migration at every service start; keep their warnings.
    for chatty in ("kafka", "httpx", "httpcore", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


class RecentLines(logging.Handler):
    """The process's last log lines, formatted as it writes them (MONAI Label's ``/logs``)."""

    def __init__(self, keep: int = 5000) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # logging never breaks the caller
            self.lines.append(self.format(record))


def keep_recent_lines(keep: int = 5000) -> RecentLines:
    """The root logger's :class:`RecentLines` (added once); what it holds from now on."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, RecentLines):
            return handler
    handler = RecentLines(keep)
    root.addHandler(handler)
    return handler


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line emitted in this context."""
    token = _context.set({**_context.get({}), **fields})
    try:
        yield
    finally:
        _context.reset(token)
