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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from vmferry.client import calls
from vmferry.client import migration_calls as mc
from vmferry.client.calls import Call
from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import bind_migration, current_migration, new_migration_id
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.protocol import StepTimes, migrate_v2, migrate_v3

#: ``progress(step, stats)``: *stats* is the source job's ``stats`` (docs/api.md, jobinfo)
#: while data moves, ``None`` when only the step changed.
ProgressCallback = Callable[[str, Mapping[str, Any] | None], None]
PROGRESS_POLL_S = 0.5

log = logging.getLogger(__name__)


class LineStream(Protocol):
    """A streaming answer (httpx's ``Response``, or :class:`vmferry.client.http1.AsyncStream`)."""

    def aiter_lines(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class Daemon(Protocol):
    """
    What the protocol needs of a client: :class:`~vmferry.client.aio.AsyncClient`
    or the CLI's :class:`~vmferry.client.stdaio.StdAsyncClient`.  Answers are
    read as JSON (``fetch``), so running a migration does not import pydantic.
    """

    @property
    def uri(self) -> str: ...

    async def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any: ...

    async def open_stream(self, path: str) -> Any: ...


def _field(daemon: Daemon, call: Call[Any], data: Any, key: str, default: Any = None) -> Any:
    """*key* of the answer *data* to *call*; ``INTERNAL_ERROR`` if it is not there."""
    value = data.get(key, default) if isinstance(data, dict) else None
    if value is None:
        raise VmferryError(
            ErrorCode.INTERNAL_ERROR,
            f"unexpected answer from vmferryd at {daemon.uri} to {call.method} {call.path}: "
            f"no {key!r}",
        )
    return value


async def _get(daemon: Daemon, call: Call[Any], key: str, default: Any = None) -> Any:
    return _field(daemon, call, await daemon.fetch(call), key, default)


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


class RemoteSource:
    """The source side over HTTP."""

    def __init__(self, client: Daemon, session: str, peer_uri: str = "") -> None:
        self.client = client
        self.session = session
        self.peer_uri = peer_uri  # the destination daemon, for the source to ask if need be

    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        call = mc.begin(name, int(flags), params.to_dict(), self.session)
        reply = await self.client.fetch(call)
        return _field(self.client, call, reply, "xml"), _field(self.client, call, reply, "cookie")

    async def perform(self, name: str, cookie: str, uri: str) -> str:
        return str(
            await _get(self.client, mc.perform(name, cookie, uri, self.peer_uri), "cookie", "")
        )

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None:
        await self.client.fetch(mc.confirm(name, cookie, cancelled))

    async def dumpxml(self, name: str) -> str:
        return str(await _get(self.client, calls.dumpxml(name, migratable=True), "xml"))

    async def perform2(
        self, name: str, uri: str, flags: MigrateFlags, params: MigrationParams
    ) -> None:
        await self.client.fetch(
            mc.perform2(name, uri, int(flags), params.to_dict(), peer_uri=self.peer_uri)
        )


class RemoteDestination:
    """The destination side over HTTP (used by clients and by a p2p source daemon)."""

    def __init__(self, client: Daemon, session: str) -> None:
        self.client = client
        self.session = session

    async def prepare(
        self, xml: str, cookie: str | None, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        call = mc.prepare(xml, cookie, int(flags), params.to_dict(), self.session)
        reply = await self.client.fetch(call)
        return _field(self.client, call, reply, "uri"), _field(self.client, call, reply, "cookie")

    async def finish(self, name: str, cookie: str | None, *, cancelled: bool, v3: bool) -> str:
        return str(await _get(self.client, mc.finish(name, cookie, cancelled, v3), "cookie", ""))

    async def state(self, name: str) -> tuple[str, str]:
        call = calls.dominfo(name)
        info = await self.client.fetch(call)
        job = _field(self.client, call, info, "job", {})
        return str(_field(self.client, call, info, "state")), str(job.get("async_job", "none"))


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
            version = 3 if host is not None and "migration-v3" in host else 2
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
    dest_stats, source_stats = await asyncio.gather(
        _job_stats(dst, params.dname or name),
        _completed_or_none(src, name),
    )
    report.stats = {**source_stats, **dest_stats}
    log.info("migration %s: done in %.3f s", params.migration_id, report.wall_s)
    return report


async def _job_stats(client: Daemon, name: str, completed: bool = True) -> dict[str, Any]:
    call = mc.jobinfo(name, completed=completed)
    stats = await _get(client, call, "stats", {})
    return dict(stats) if isinstance(stats, dict) else {}


async def _completed_or_none(client: Daemon, name: str) -> dict[str, Any]:
    try:
        return await _job_stats(client, name)
    except VmferryError:
        return {}


async def _probe(client: Daemon) -> list[str] | None:
    """The destination's features (``GET /v1/host``)."""
    features = await _get(client, calls.host(), "features", [])
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
        call = mc.migrate_p2p(name, dest_uri, int(flags), params.to_dict())
        result = await src.fetch(call)
    steps = _field(src, call, result, "steps", {})
    stats = _field(src, call, result, "stats", {})
    return MigrationReport(
        wall_s=time.perf_counter() - started,
        steps={str(k): float(v) for k, v in steps.items()},
        stats=dict(stats),
        migration_id=params.migration_id,
    )


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
                progress("perform", await _job_stats(src, name, completed=False))

    task = asyncio.create_task(poll()) if progress is not None else None
    try:
        yield on_step
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
