"""
Log lines that can be followed across hosts: the migration id, text or JSON lines.

Every migration has one id (:func:`new_migration_id`), made by the client that
starts it (or by the source daemon when the caller sent none) and carried in
the migration parameters of each API call. Code handling a migration binds it
with :func:`bind_migration`; a context variable, so it follows the request's
task and every task spawned from it, and the daemon's log filter
(:class:`vmferry.logformat.MigrationIdFilter`) stamps it on each record.
``grep ID`` on both daemons' logs (and the client's) then shows one migration
from Begin to Confirm.

Outside the layers and importing nothing of vmferry: the daemon, the client
library and the CLI all use it, and the CLI must stay quick to import: it does
not import :mod:`logging` either (:func:`get_logger`); the daemon's log lines
are formatted by :mod:`vmferry.logformat`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

#: The migration the running code works for ("" if none).
_migration_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "vmferry_migration_id", default=""
)

#: What a migration id may be: it is written into logs, so no spaces or control characters.
MIGRATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


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


#: logging's WARNING: records below it go nowhere until a program configures logging.
_WARNING = 30


class Logger:
    """
    ``logging.getLogger(name)``, without importing :mod:`logging` for nothing.

    Until some code imports :mod:`logging`, nothing can have configured it, so
    a debug or info record would go nowhere (the root logger's default level is
    WARNING): such a record is dropped without the import (~10 % of
    ``vmferry migrate``'s start, issue 10).  Once :mod:`logging` is loaded (the
    daemon, tests, a program using the client library), every record goes to
    the real logger; a warning or an error always does, importing it if need be.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _logger(self, level: int) -> logging.Logger | None:
        if "logging" not in sys.modules and level < _WARNING:
            return None
        import logging

        return logging.getLogger(self.name)

    def _log(self, level: int, msg: str, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        logger = self._logger(level)
        if logger is not None and logger.isEnabledFor(level):
            kwargs.setdefault("stacklevel", 3)  # the caller's line, not this module's
            logger.log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(10, msg, args, kwargs)

    def info(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(20, msg, args, kwargs)

    def warning(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(_WARNING, msg, args, kwargs)

    def error(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(40, msg, args, kwargs)


def get_logger(name: str) -> Logger:
    """The logger *name* for modules on the CLI's path (:class:`Logger`)."""
    return Logger(name)
