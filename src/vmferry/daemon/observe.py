"""Each migration step as this host saw it: its id in the logs, its time, and the outcome.

The migration service runs every step inside :meth:`MigrationObserver.step`,
which binds the migration's id for the step's log lines (and the tasks it
spawns), times the step, and when the step ended this side's job, counts the
migration by result and adds the per-step times (``source_phases_ms`` or
``destination_phases_ms``) and the id to the completed job's statistics, the
ones ``domjobinfo --completed`` shows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob
from vmferry.logs import bind_migration, current_migration, new_migration_id
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.qemu.domain import QemuDomain

if TYPE_CHECKING:
    from vmferry.daemon.metrics import Metrics

log = logging.getLogger(__name__)

SOURCE = "source"
DESTINATION = "destination"
_JOB = {SOURCE: AsyncJob.MIGRATION_OUT, DESTINATION: AsyncJob.MIGRATION_IN}


def mode_of(flags: int) -> str:
    """The ``mode`` label: offline, postcopy, live or paused (virsh's default, not live)."""
    f = MigrateFlags(flags)
    if f & MigrateFlags.OFFLINE:
        return "offline"
    if f & MigrateFlags.POSTCOPY:
        return "postcopy"
    return "live" if f & MigrateFlags.LIVE else "paused"


def bind_params(params: MigrationParams) -> str:
    """Bind the id of *params* for this task's log lines, making one if the caller sent none."""
    if not params.migration_id:
        params.migration_id = new_migration_id()
    return bind_migration(params.migration_id)


@dataclass
class _Trace:
    migration_id: str
    mode: str
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step


def _result(error: BaseException | None, *, final: bool, cancelled: bool) -> str:
    if isinstance(error, VmferryError) and error.code == ErrorCode.OPERATION_ABORTED:
        return "aborted"
    if error is not None or not final:
        return "failed"
    return "cancelled" if cancelled else "completed"


class MigrationObserver:
    """Times the steps of the migrations of one daemon; feeds :class:`Metrics` if bound."""

    def __init__(self) -> None:
        self.metrics: Metrics | None = None
        self._traces: dict[tuple[str, str], _Trace] = {}  # (side, domain uuid)

    @contextlib.contextmanager
    def step(
        self,
        side: str,
        phase: str,
        dom: QemuDomain | None = None,
        *,
        find: Callable[[], QemuDomain | None] | None = None,
        flags: int | None = None,
        first: bool = False,
        final: bool = False,
        cancelled: bool = False,
    ) -> Iterator[None]:
        """
        Run one step of a migration of *dom* (or of the domain *find* gives afterwards).

        :param first: The step that starts this side's job (Begin, Prepare, Perform2).
        :param final: The step that completes it when it succeeds (Confirm, Finish, Perform2).
        :param cancelled: Confirm or Finish told that the migration was cancelled.
        """
        if dom is not None and not first:
            self._bind_existing(side, dom)
        what = dom.name if dom is not None else "an incoming domain"
        log.info("%s %s of %s starts", side, phase, what)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - started
            if dom is None and find is not None:
                dom = find()
            self._done(side, phase, dom, seconds, error, flags, first, final, cancelled)

    def _bind_existing(self, side: str, dom: QemuDomain) -> None:
        trace = self._traces.get((side, dom.uuid))
        params = dom.migration.params
        mid = (params.migration_id if params is not None else "") or (
            trace.migration_id if trace is not None else ""
        )
        if mid:
            bind_migration(mid)

    def _done(
        self,
        side: str,
        phase: str,
        dom: QemuDomain | None,
        seconds: float,
        error: BaseException | None,
        flags: int | None,
        first: bool,
        final: bool,
        cancelled: bool,
    ) -> None:
        m = self.metrics
        if m is not None:
            m.phase_seconds.labels(side, phase).observe(seconds)
        outcome = "failed" if error is not None else "done"
        log.info("%s %s %s in %.0f ms", side, phase, outcome, seconds * 1000)
        mode = mode_of(flags if flags is not None else (dom.migration.flags if dom else 0))
        if first and (error is not None or dom is None):
            # Refused before this side's job was ours (maybe another migration holds it).
            self._count(side, mode, _result(error, final=final, cancelled=cancelled))
            return
        if dom is None:
            return
        key = (side, dom.uuid)
        if first or key not in self._traces:
            self._traces[key] = _Trace(current_migration(), mode)
        trace = self._traces[key]
        trace.phases[phase] = trace.phases.get(phase, 0.0) + seconds
        if dom.job.is_active(_JOB[side]):
            return  # the job goes on (also a post-copy failure kept for a resume)
        del self._traces[key]
        result = _result(error, final=final, cancelled=cancelled)
        self._count(side, trace.mode, result)
        phases_ms = {p: round(s * 1000, 1) for p, s in trace.phases.items()}
        log.info(
            "migration of %s %s on the %s: %s",
            dom.name,
            result,
            side,
            ", ".join(f"{p} {ms:g} ms" for p, ms in phases_ms.items()),
        )
        if result == "completed" and dom.completed_job is not None:
            self._completed(side, dom.completed_job, trace, phases_ms)

    def _count(self, side: str, mode: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.migrations.labels(side, mode, result).inc()

    def _completed(
        self, side: str, stats: dict[str, Any], trace: _Trace, phases_ms: dict[str, float]
    ) -> None:
        # The same dict the driver keeps for domjobinfo --completed (also once the domain left).
        stats[f"{side}_phases_ms"] = phases_ms
        if trace.migration_id:
            stats["migration_id"] = trace.migration_id
        m = self.metrics
        if m is None:
            return
        moved = stats.get("data_processed")
        if isinstance(moved, int | float) and moved > 0:
            m.bytes.labels(side).inc(moved)
        for key, kind in (("downtime_ms", "qemu"), ("guest_downtime_ms", "guest")):
            value = stats.get(key)
            if isinstance(value, int | float) and value >= 0:
                m.downtime.labels(side, kind).observe(value / 1000)
