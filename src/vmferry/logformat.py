"""
How the daemon's log lines look: text or JSON, each stamped with its migration id.

Separate from :mod:`vmferry.logs` so that the CLI, which never formats a log line,
does not import :mod:`logging` (see :class:`vmferry.logs.Logger`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from vmferry.logs import current_migration

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(migration_suffix)s"
LOG_FORMATS = ("text", "json")


def _datetime() -> Any:
    import datetime  # only JSON lines need it

    return datetime


class MigrationIdFilter(logging.Filter):
    """Adds ``migration_id`` (and the text format's ``migration_suffix``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        mid = getattr(record, "migration_id", "") or current_migration()
        record.migration_id = mid
        record.migration_suffix = f" migration={mid}" if mid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, migration_id."""

    def format(self, record: logging.LogRecord) -> str:
        dt = _datetime()
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        mid = getattr(record, "migration_id", "")
        if mid:
            entry["migration_id"] = mid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of ``--log-format`` *kind* (``text`` or ``json``)."""
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {kind!r} (known: {', '.join(LOG_FORMATS)})")


def setup(level: str = "info", kind: str = "text", stream: Any = None) -> logging.Handler:
    """Configure the root logger: one stream handler (stderr) with *kind* lines at *level*."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(kind))
    handler.addFilter(MigrationIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
