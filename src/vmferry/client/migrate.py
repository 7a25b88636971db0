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
from dataclasses import dataclass, field, replace

from vmferry.api.models import HostInfo, JobStats
from vmferry.client import migration_calls as mc
from vmferry.client.aio import AsyncClient
from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import bind_migration, current_migration, new_migration_id
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.protocol import StepTimes, migrate_v2, migrate_v3

ProgressCallback = Callable[[str, JobStats | None], None]
PROGRESS_POLL_S = 0.5

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_session(client: AsyncClient) -> AsyncIterator[str]:
    """A session on *client*'s daemon for as long as the block runs; yields its id."""
    response = await client.open_stream(mc.SESSION_PATH)
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


class RemoteSource:
    """The source side over HTTP."""

    def __init__(self, client: AsyncClient, session: str, peer_uri: str = "") -> None:
        self.client = client
        self.session = session
        self.peer_uri = peer_uri  # the destination daemon, for the source to ask if need be

    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        reply = await self.client.run(mc.begin(name, int(flags), params.to_dict(), self.session))
        return reply.xml, reply.cookie

    async def perform(self, name: str, cookie: str, uri: str) -> str:
        return (await self.client.run(mc.perform(name, cookie, uri, self.peer_uri))).cookie

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None:
        await self.client.run(mc.confirm(name, cookie, cancelled))

    async def dumpxml(self, name: str) -> str:
        return await self.client.dumpxml(name, migratable=True)

    async def perform2(
        self, name: str, uri: str, flags: MigrateFlags, params: MigrationParams
    ) -> None:
        await self.client.run(
            mc.perform2(name, uri, int(flags), params.to_dict(), peer_uri=self.peer_uri)
        )


class RemoteDestination:
    """The destination side over HTTP (used by clients and by a p2p source daemon)."""

    def __init__(self, client: AsyncClient, session: str) -> None:
        self.client = client
        self.session = session

    async def prepare(
        self, xml: str, cookie: str | None, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        reply = await self.client.run(
            mc.prepare(xml, cookie, int(flags), params.to_dict(), self.session)
        )
        return reply.uri, reply.cookie

    async def finish(self, name: str, cookie: str | None, *, cancelled: bool, v3: bool) -> str:
        return (await self.client.run(mc.finish(name, cookie, cancelled, v3))).cookie

    async def state(self, name: str) -> tuple[str, str]:
        info = await self.client.dominfo(name)
        return info.state, info.job.async_job


@dataclass
class MigrationReport:
    """What a finished migration cost, for the CLI's table and the benchmark."""

    wall_s: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)
    #: The id both daemons' log lines of this migration carry (``grep`` it).
    migration_id: str = ""


def with_migration_id(params: MigrationParams | None) -> MigrationParams:
    """A copy of *params* with an id (a new one unless the caller chose it), bound for logging."""
    params = replace(params or MigrationParams())
    params.migration_id = params.migration_id or new_migration_id()
    bind_migration(params.migration_id)
    return params


async def migrate(
    src: AsyncClient,
    dst: AsyncClient,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    *,
    version: int | None = None,
    progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Migrate *name* from *src*'s host to *dst*'s, the client running the protocol."""
    params = with_migration_id(params)
    params.validate(flags)
    if flags & MigrateFlags.TUNNELLED:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            "a tunnelled migration is peer-to-peer: the daemons carry the stream (use --p2p)",
        )
    # The id in the text too: a program's own log format shows it without vmferry.logs.
    log.info("migration %s: %s from %s to %s", params.migration_id, name, src.uri, dst.uri)
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
            version = 3 if host is not None and "migration-v3" in host.features else 2
        source = RemoteSource(src, src_session, peer_uri=dst.uri)
        dest = RemoteDestination(dst, dst_session)
        async with _watch_progress(src, name, progress) as on_step:
            run = migrate_v3 if version == 3 else migrate_v2
            await run(source, dest, name, flags, params, on_step=on_step, times=times)
    report = MigrationReport(
        wall_s=time.perf_counter() - started, steps=times.steps, migration_id=params.migration_id
    )
    # The destination knows both sides' figures (the source's came in the cookie).
    # Both at once: the destination knows the downtime the guest saw, the source
    # everything else (the policy's actions; all of it in v2, which has no cookies).
    dest_job, source_job = await asyncio.gather(
        dst.run(mc.jobinfo(params.dname or name, completed=True)),
        _completed_or_none(src, name),
    )
    report.stats = {**(source_job.stats if source_job else {}), **dest_job.stats}
    log.info("migration %s: done in %.3f s", params.migration_id, report.wall_s)
    return report


async def _completed_or_none(client: AsyncClient, name: str) -> JobStats | None:
    try:
        job: JobStats = await client.run(mc.jobinfo(name, completed=True))
    except VmferryError:
        return None
    return job


async def _probe(client: AsyncClient) -> HostInfo | None:
    return await client.host()


async def _no_probe() -> HostInfo | None:
    return None


async def migrate_p2p(
    src: AsyncClient,
    dest_uri: str,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Ask *src*'s daemon to migrate *name* to *dest_uri* itself (peer-to-peer)."""
    params = with_migration_id(params)
    params.validate(flags)
    log.info(
        "migration %s: %s from %s to %s (peer-to-peer)",
        params.migration_id,
        name,
        src.uri,
        dest_uri,
    )
    started = time.perf_counter()
    async with _watch_progress(src, name, progress) as on_step:
        on_step("perform")
        result = await src.run(mc.migrate_p2p(name, dest_uri, int(flags), params.to_dict()))
    return MigrationReport(
        wall_s=time.perf_counter() - started,
        steps=result.steps,
        stats=result.stats,
        migration_id=params.migration_id,
    )


@contextlib.asynccontextmanager
async def _watch_progress(
    src: AsyncClient, name: str, progress: ProgressCallback | None
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
                stats: JobStats = await src.run(mc.jobinfo(name))
                progress("perform", stats)

    task = asyncio.create_task(poll()) if progress is not None else None
    try:
        yield on_step
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
