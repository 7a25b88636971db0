"""Client-managed and peer-to-peer migration, run from the client library.

``await migrate(src, dst, name, flags, params)`` drives the protocol across
two daemons (v3 when both support it, else v2), holding a session on each so
that a client that dies mid-way is noticed (libvirt's close callbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from vmferry.client import calls
from vmferry.client import migration_calls as mc
from vmferry.client.migrate_sides import (
    PROGRESS_POLL_S,
    Daemon,
    LineStream,
    MigrationReport,
    ProgressCallback,
    RemoteDestination,
    RemoteSource,
    fetch_field,
    job_stats,
    p2p_report,
    report_stats,
    start_migration,
    with_migration_id,
)
from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import current_migration
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.protocol import StepTimes, migrate_v2, migrate_v3

log = logging.getLogger(__name__)

__all__ = [
    "PROGRESS_POLL_S",
    "Daemon",
    "LineStream",
    "MigrationReport",
    "ProgressCallback",
    "RemoteDestination",
    "RemoteSource",
    "migrate",
    "migrate_p2p",
    "open_session",
    "with_migration_id",
]


@contextlib.asynccontextmanager
async def open_session(client: Daemon) -> AsyncIterator[str]:
    """A session on *client*'s daemon for as long as the block runs; yields its id."""
    response: LineStream = await client.open_stream(mc.SESSION_PATH)
    try:
        lines = response.aiter_lines()
        first = await anext(lines, "")
        try:
            session = str(json.loads(first)["session"])
        except (ValueError, KeyError, TypeError) as err:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR, f"unexpected session answer from {client.uri}: {first!r}"
            ) from err

        async def drain() -> None:
            with contextlib.suppress(Exception):
                async for _ in lines:
                    pass

        keepalive = asyncio.create_task(drain())
        try:
            yield session
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
    finally:
        await response.aclose()


async def migrate(
    src: Daemon,
    dst: Daemon,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    *,
    version: int | None = None,
    progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Migrate *name* from *src*'s host to *dst*'s, the client running the protocol."""
    params = start_migration(params, flags, name, src.uri, dst.uri)
    started = time.perf_counter()
    times = StepTimes()
    async with contextlib.AsyncExitStack() as stack:
        # Independent round trips: one wait instead of three.
        src_session, dst_session, host = await asyncio.gather(
            stack.enter_async_context(open_session(src)),
            stack.enter_async_context(open_session(dst)),
            _probe(dst) if version is None else _no_probe(),
        )
        if version is None:
            version = 3 if host is not None and "migration-v3" in host else 2
        source = RemoteSource(src, src_session, peer_uri=dst.uri)
        dest = RemoteDestination(dst, dst_session)
        async with _watch_progress(src, name, progress) as on_step:
            run = migrate_v3 if version == 3 else migrate_v2
            await run(source, dest, name, flags, params, on_step=on_step, times=times)
    report = MigrationReport(
        wall_s=time.perf_counter() - started, steps=times.steps, migration_id=params.migration_id
    )
    report.stats = await report_stats(source, dest, name, params.dname or name)
    log.info("migration %s: done in %.3f s", params.migration_id, report.wall_s)
    return report


async def _probe(client: Daemon) -> list[str] | None:
    """The destination's features (``GET /v1/host``)."""
    features = await fetch_field(client, calls.host(), "features", [])
    return [str(f) for f in features] if isinstance(features, list) else []


async def _no_probe() -> list[str] | None:
    return None


async def migrate_p2p(
    src: Daemon,
    dest_uri: str,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Ask *src*'s daemon to migrate *name* to *dest_uri* itself (peer-to-peer)."""
    params = start_migration(params, flags, name, src.uri, dest_uri, p2p=True)
    started = time.perf_counter()
    async with _watch_progress(src, name, progress) as on_step:
        on_step("perform")
        call = mc.migrate_p2p(name, dest_uri, int(flags), params.to_dict())
        result = await src.fetch(call)
    return p2p_report(src, call, result, started, params.migration_id)


@contextlib.asynccontextmanager
async def _watch_progress(
    src: Daemon, name: str, progress: ProgressCallback | None
) -> AsyncIterator[Callable[[str], None]]:
    """Report each step, and the source's job statistics while data moves."""
    current = {"step": ""}

    def on_step(step: str) -> None:
        current["step"] = step
        log.info("migration %s: %s", current_migration(), step)
        if progress is not None:
            progress(step, None)

    async def poll() -> None:
        while True:
            await asyncio.sleep(PROGRESS_POLL_S)
            if current["step"] != "perform" or progress is None:
                continue
            with contextlib.suppress(VmferryError):
                progress("perform", await job_stats(src, name, completed=False))

    task = asyncio.create_task(poll()) if progress is not None else None
    try:
        yield on_step
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
