"""
Log lines that can be followed across hosts: the migration id, text or JSON lines.

Every migration has one id (:func:`new_migration_id`), made by the client that
starts it (or by the source daemon when the caller sent none) and carried in
the migration parameters of each API call. Code handling a migration binds it
with :func:`bind_migration`; a context variable, so it follows the request's
task and every task spawned from it, and :class:`MigrationIdFilter` stamps it
on each record. ``grep ID`` on both daemons' logs (and the client's) then
shows one migration from Begin to Confirm.

Outside the layers and importing nothing of vmferry: the daemon, the client
library and the CLI all use it, and the CLI must stay quick to import.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

#: The migration the running code works for ("" if none).
_migration_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "vmferry_migration_id", default=""
)

#: What a migration id may be: it is written into logs, so no spaces or control characters.
MIGRATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(migration_suffix)s"
LOG_FORMATS = ("text", "json")


def _datetime() -> Any:
    import datetime  # only JSON lines need it: the CLI does not pay for its import

    return datetime


def new_migration_id() -> str:
    """A fresh id: 16 hex digits, enough to be unique in any log and short to type."""
    return os.urandom(8).hex()  # not `secrets`: importing it costs the CLI ~30 ms


def is_migration_id(text: str) -> bool:
    return MIGRATION_ID.fullmatch(text) is not None


def bind_migration(migration_id: str) -> str:
    """Log what the current task (and the tasks it spawns) does as part of *migration_id*."""
    _migration_id.set(migration_id)
    return migration_id


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """No migration id in the block, nor in the tasks it starts (they may outlive the migration)."""
    token = _migration_id.set("")
    try:
        yield
    finally:
        _migration_id.reset(token)


def current_migration() -> str:
    """The migration id bound in this context ("" if none)."""
    return _migration_id.get()


class MigrationIdFilter(logging.Filter):
    """Adds ``migration_id`` (and the text format's ``migration_suffix``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        mid = getattr(record, "migration_id", "") or _migration_id.get()
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
