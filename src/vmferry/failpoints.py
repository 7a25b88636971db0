"""Failpoints: named places where a test can make the daemon fail on purpose.

Like etcd's gofail. A failpoint is a named ``await failpoint("name")`` in the
code; nothing happens unless the daemon was started with::

    VMFERRY_FAILPOINTS="src-perform3-after=exit,dst-prepare-before=error"

Actions:

* ``exit``: the daemon dies at once (SIGKILL to itself: no cleanup, no
  flushing, exactly like a crash or ``kill -9``).
* ``hang``: the calling task blocks until it is cancelled.
* ``error``: raise ``VmferryError(INTERNAL_ERROR, "failpoint NAME hit")``.
* ``bug``: raise ``RuntimeError`` (an unexpected exception: a bug, a 500).
* ``pause``: create ``$VMFERRY_FAILPOINTS_DIR/NAME.hit``, wait until ``NAME.release``
  exists there, then go on as if nothing happened (the fault matrix acts meanwhile).

The points (:data:`POINTS`) sit at each migration phase boundary on both
sides, ``<step>-before`` once the step's phase is persisted and before its
work, ``<step>-after`` once the work and the new phase are persisted and
before the answer goes out, plus ``src-perform-migrating`` inside Perform
after ``migrate`` was issued and QEMU reports the migration active, and
``dst-postcopy-running`` inside a post-copy Finish once the guest runs on the
destination (after ``cont``) and before waiting for the stream to complete,
and the storage migration points (:data:`STORAGE_POINTS`).
``status-write`` and ``definition-write`` are I/O points (:func:`fail_io`): with
``error`` every write of a domain's status file (definition) fails as on a full disk.

Usage::

    failpoints.load_from_env()          # at daemon start: bad names fail here
    await failpoint("src-begin-after")  # returns at once when nothing is enabled
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
from pathlib import Path

from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

#: The environment variable read by :func:`load_from_env`.
ENV_VAR = "VMFERRY_FAILPOINTS"

_STEPS = (
    "src-begin",
    "src-perform3",
    "src-perform2",
    "src-confirm3",
    "dst-prepare",
    "dst-finish",
)

#: Synchronous I/O failpoints (:func:`fail_io`): ``error`` makes the write fail with ENOSPC.
IO_POINTS = ("status-write", "definition-write")

#: Storage migration (docs/storage-migration.md): before the mirrors start, once they are all
#: in sync (the memory not yet moving), at the switchover (vCPUs stopped, before the mirrors
#: drain); the destination once its disks exist (before QEMU starts) and in Finish once the
#: NBD server stopped (before ``cont``).
STORAGE_POINTS = (
    "src-perform-mirror",
    "src-perform-mirror-ready",
    "src-perform-switchover",
    "dst-prepare-storage",
    "dst-finish-storage",
)

#: Every failpoint the code has.
POINTS: frozenset[str] = frozenset(
    [f"{step}-{when}" for step in _STEPS for when in ("before", "after")]
    + ["src-perform-migrating", "dst-postcopy-running"]
    + list(STORAGE_POINTS)
    + list(IO_POINTS)
)

#: What a failpoint may do.
ACTIONS: frozenset[str] = frozenset({"exit", "hang", "error", "pause", "bug"})

#: ``pause`` creates ``<name>.hit`` in this directory and waits for ``<name>.release``.
DIR_ENV = "VMFERRY_FAILPOINTS_DIR"
PAUSE_POLL_S = 0.05

# name -> action; empty means every failpoint is a no-op (the only check on the hot path)
_enabled: dict[str, str] = {}


def parse(spec: str) -> dict[str, str]:
    """
    Parse ``"name=action[,name=action]"``.

    :raise VmferryError: ``INVALID_ARG`` naming the unknown failpoint or action.
    """
    result: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, action = item.partition("=")
        name, action = name.strip(), action.strip()
        if not sep or name not in POINTS:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"{ENV_VAR}: unknown failpoint {name!r} in {item!r}; "
                f"known: {', '.join(sorted(POINTS))}",
            )
        if action not in ACTIONS:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"{ENV_VAR}: unknown action {action!r} for failpoint {name!r}; "
                f"use one of {', '.join(sorted(ACTIONS))}",
            )
        result[name] = action
    return result


def configure(spec: str) -> None:
    """Enable exactly the failpoints of *spec* (an empty string disables all)."""
    parsed = parse(spec)
    _enabled.clear()
    _enabled.update(parsed)
    for name, action in sorted(parsed.items()):
        log.warning("failpoint %s armed: %s", name, action)


def load_from_env() -> None:
    """:func:`configure` from ``$VMFERRY_FAILPOINTS`` (unset: all disabled)."""
    configure(os.environ.get(ENV_VAR, ""))


def armed(name: str) -> bool:
    """Whether *name* has an action (lets a caller skip work that only a failpoint needs)."""
    return bool(_enabled) and name in _enabled


async def _pause(name: str) -> None:
    # Another process releases us through the file system: nothing to wait on but it.
    where = Path(os.environ.get(DIR_ENV, "."))
    (where / f"{name}.hit").touch()
    release = where / f"{name}.release"
    while not release.exists():  # noqa: ASYNC110
        await asyncio.sleep(PAUSE_POLL_S)
    log.warning("failpoint %s released", name)


def fail_io(name: str) -> None:
    """An I/O failpoint: ``error`` raises ``OSError(ENOSPC)`` (a full disk), ``exit`` dies."""
    if not _enabled:
        return
    action = _enabled.get(name)
    if action == "error":
        log.warning("failpoint %s hit: %s", name, action)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "bug":
        raise RuntimeError(f"failpoint {name}: simulated bug")
    if action == "exit":
        log.warning("failpoint %s hit: %s", name, action)
        os.kill(os.getpid(), signal.SIGKILL)


async def failpoint(name: str) -> None:
    """Run the action of failpoint *name*, if it has one."""
    if not _enabled:
        return
    action = _enabled.get(name)
    if action is None:
        return
    log.warning("failpoint %s hit: %s", name, action)
    if action == "exit":
        # Make the log line visible to whoever reads the daemon's log after the crash.
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(3600)  # pragma: no cover - SIGKILL is not delivered late
    if action == "hang":
        await asyncio.Event().wait()
    if action == "pause":
        await _pause(name)
        return
    if action == "bug":
        raise RuntimeError(f"failpoint {name}: simulated bug")
    raise VmferryError(ErrorCode.INTERNAL_ERROR, f"failpoint {name} hit")
