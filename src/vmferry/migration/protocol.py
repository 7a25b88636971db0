"""The protocol sequences, run by whoever manages the migration.

A post-copy resume (``MigrateFlags.POSTCOPY_RESUME``) runs the same v3
sequence; each side's steps resume instead of starting a migration, and every
failure branch returns both sides to ``postcopy_failed`` instead of resuming
the source.

The client library runs them against two daemons (client-managed migration);
the source daemon runs them itself against the destination (peer-to-peer).
The sequences follow libvirt's ``virDomainMigrateVersion3Full`` and
``virDomainMigrateVersion2``, with one change where libvirt can lose or
duplicate a guest: when Finish's outcome is unknown (the answer was lost, not
refused), the source is not resumed blindly; the destination is asked first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import get_logger
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams

log = get_logger(__name__)

# Errors that say the request may or may not have been carried out.
UNKNOWN_OUTCOME = frozenset({ErrorCode.RPC_FAILED})


class SourceSide(Protocol):
    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]: ...

    async def perform(self, name: str, cookie: str, uri: str) -> str: ...

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None: ...

    async def dumpxml(self, name: str) -> str: ...

    async def perform2(
        self, name: str, uri: str, flags: MigrateFlags, params: MigrationParams
    ) -> None: ...


class DestinationSide(Protocol):
    async def prepare(
        self, xml: str, cookie: str | None, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]: ...

    async def finish(self, name: str, cookie: str | None, *, cancelled: bool, v3: bool) -> str: ...

    async def state(self, name: str) -> tuple[str, str]:
        """(state, async job) of the domain on the destination."""
        ...


class StepTimes:
    """Wall time of each protocol step, for progress and the benchmark's breakdown.

    A plain class: ``vmferry migrate`` imports this module, not ``dataclasses``.
    """

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def record(self, step: str, started: float) -> None:
        self.steps[step] = self.steps.get(step, 0.0) + time.perf_counter() - started


Progress = Callable[[str], None]


async def migrate_v3(
    src: SourceSide,
    dst: DestinationSide,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    on_step: Progress | None = None,
    times: StepTimes | None = None,
) -> None:
    """Begin → Prepare → Perform → Finish → Confirm, with libvirt's failure branches."""
    times = times or StepTimes()
    step = _stepper(on_step, times)
    dest_name = params.dname or name
    offline = bool(flags & MigrateFlags.OFFLINE)

    t = step("begin")
    xml, cookie = await src.begin(name, flags, params)
    begin_cookie = cookie
    times.record("begin", t)

    t = step("prepare")
    try:
        uri, cookie = await dst.prepare(xml, cookie, flags & ~MigrateFlags.source_only(), params)
    except VmferryError:
        await _confirm_quietly(src, name, "", cancelled=True)
        raise
    times.record("prepare", t)
    if params.migrate_uri and not flags & MigrateFlags.POSTCOPY_RESUME:
        uri = params.migrate_uri  # a resume goes to the new port migrate-recover listens on

    if offline:
        cookie = begin_cookie  # no Perform: Finish hears from the source's Begin
    else:
        t = step("perform")
        try:
            cookie = await src.perform(name, cookie, uri)
        except VmferryError as err:
            # The source already resumed the guest and ended its job: no Confirm.
            await _finish_quietly(dst, dest_name)
            if err.code in UNKNOWN_OUTCOME:
                raise VmferryError(
                    ErrorCode.OPERATION_FAILED,
                    f"lost the connection to the source during Perform: {err.message}",
                ) from err
            raise
        times.record("perform", t)

    t = step("finish")
    try:
        cookie = await dst.finish(dest_name, cookie, cancelled=False, v3=True)
    except VmferryError as err:
        if err.code not in UNKNOWN_OUTCOME or not await _arrived(dst, dest_name, name, err):
            await _confirm_quietly(src, name, "", cancelled=True)
            raise
        cookie = ""
    times.record("finish", t)

    t = step("confirm")
    try:
        await src.confirm(name, cookie, cancelled=False)
    except VmferryError as err:
        log.warning("Guest %s probably left in 'paused' state on source: %s", name, err.message)
    times.record("confirm", t)


async def migrate_v2(
    src: SourceSide,
    dst: DestinationSide,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    on_step: Progress | None = None,
    times: StepTimes | None = None,
) -> None:
    """DumpXML → Prepare → Perform (kills or resumes the source) → Finish."""
    times = times or StepTimes()
    step = _stepper(on_step, times)
    dest_name = params.dname or name
    xml = await src.dumpxml(name)
    t = step("prepare")
    uri, _ = await dst.prepare(xml, None, flags & ~MigrateFlags.source_only(), params)
    times.record("prepare", t)
    if params.migrate_uri:
        uri = params.migrate_uri
    t = step("perform")
    try:
        await src.perform2(name, uri, flags, params)
    except VmferryError as err:
        if err.code not in UNKNOWN_OUTCOME:
            await _finish_quietly(dst, dest_name, v3=False)
            raise
        # Perform2's answer was lost: the source may have sent everything and killed itself.
        # The destination's own stream says which: Finish resumes a complete one, kills the rest.
        await dst.finish(dest_name, None, cancelled=False, v3=False)
        times.record("perform", t)
        return
    times.record("perform", t)
    t = step("finish")
    await dst.finish(dest_name, None, cancelled=False, v3=False)
    times.record("finish", t)


def _stepper(on_step: Progress | None, times: StepTimes) -> Callable[[str], float]:
    def step(name: str) -> float:
        if on_step is not None:
            on_step(name)
        return time.perf_counter()

    return step


async def _confirm_quietly(src: SourceSide, name: str, cookie: str, *, cancelled: bool) -> None:
    try:
        await src.confirm(name, cookie, cancelled=cancelled)
    except VmferryError as err:
        log.warning("confirm (cancelled=%s) of %s failed: %s", cancelled, name, err.message)


async def _finish_quietly(dst: DestinationSide, name: str, *, v3: bool = True) -> None:
    try:
        await dst.finish(name, None, cancelled=True, v3=v3)
    except VmferryError as err:
        log.warning("finish (cancelled) of %s failed: %s", name, err.message)


async def _arrived(dst: DestinationSide, name: str, source_name: str, err: VmferryError) -> bool:
    """Did the guest end up running on the destination after a Finish whose answer was lost?

    When nobody can tell, the source must stay paused: resuming it could run the
    guest twice, killing it could lose it.
    """
    try:
        state, async_job = await dst.state(name)
    except VmferryError as query_err:
        if query_err.code == ErrorCode.NO_DOMAIN:
            return False
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"the outcome of Finish on the destination is unknown ({err.message}); "
            f"domain '{source_name}' stays paused on the source until it is resolved",
        ) from err
    return state in ("running", "paused") and async_job == "none"
