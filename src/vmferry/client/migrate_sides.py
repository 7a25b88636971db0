"""The two sides of a client-managed migration over HTTP, without asyncio.

:class:`RemoteSource` and :class:`RemoteDestination` turn the protocol's steps
(:mod:`vmferry.migration.protocol`) into API calls on a :class:`Daemon`.  The
asyncio driver (:mod:`vmferry.client.migrate`) and the CLI's blocking one
(:mod:`vmferry.client.migrate_blocking`) share them; this module imports no
event loop, so ``vmferry migrate`` does not pay for asyncio's import.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from vmferry.client import calls
from vmferry.client import migration_calls as mc
from vmferry.client.calls import Call
from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import bind_migration, get_logger, new_migration_id
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams

#: ``progress(step, stats)``: *stats* is the source job's ``stats`` (docs/api.md, jobinfo)
#: while data moves, ``None`` when only the step changed.
ProgressCallback = Callable[[str, Mapping[str, Any] | None], None]
PROGRESS_POLL_S = 0.5

log = get_logger("vmferry.client.migrate")


class LineStream(Protocol):
    """A streaming answer (httpx's ``Response``)."""

    def aiter_lines(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class Daemon(Protocol):
    """
    What the protocol needs of a client: :class:`~vmferry.client.aio.AsyncClient`
    or the CLI's :class:`~vmferry.client.migrate_blocking.BlockingDaemon`.  Answers are
    read as JSON (``fetch``), so running a migration does not import pydantic.
    """

    @property
    def uri(self) -> str: ...

    async def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any: ...

    async def open_stream(self, path: str) -> Any: ...


def answer_field(daemon: Daemon, call: Call[Any], data: Any, key: str, default: Any = None) -> Any:
    """*key* of the answer *data* to *call*; ``INTERNAL_ERROR`` if it is not there."""
    value = data.get(key, default) if isinstance(data, dict) else None
    if value is None:
        raise VmferryError(
            ErrorCode.INTERNAL_ERROR,
            f"unexpected answer from vmferryd at {daemon.uri} to {call.method} {call.path}: "
            f"no {key!r}",
        )
    return value


async def fetch_field(daemon: Daemon, call: Call[Any], key: str, default: Any = None) -> Any:
    return answer_field(daemon, call, await daemon.fetch(call), key, default)


def completed_stats(reply: Any) -> dict[str, Any] | None:
    """The completed job's figures a Finish or Confirm reply carries (None: it has none)."""
    stats = reply.get("stats") if isinstance(reply, dict) else None
    return dict(stats) if isinstance(stats, dict) else None


class RemoteSource:
    """The source side over HTTP."""

    def __init__(self, client: Daemon, session: str, peer_uri: str = "") -> None:
        self.client = client
        self.session = session
        self.peer_uri = peer_uri  # the destination daemon, for the source to ask if need be
        #: The source's completed job, as Confirm's reply carried it (no jobinfo call after).
        self.completed: dict[str, Any] | None = None

    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        call = mc.begin(name, int(flags), params.to_dict(), self.session)
        reply = await self.client.fetch(call)
        xml = answer_field(self.client, call, reply, "xml")
        return xml, answer_field(self.client, call, reply, "cookie")

    async def perform(self, name: str, cookie: str, uri: str) -> str:
        call = mc.perform(name, cookie, uri, self.peer_uri)
        return str(await fetch_field(self.client, call, "cookie", ""))

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None:
        reply = await self.client.fetch(mc.confirm(name, cookie, cancelled))
        if not cancelled:
            self.completed = completed_stats(reply)

    async def dumpxml(self, name: str) -> str:
        return str(await fetch_field(self.client, calls.dumpxml(name, migratable=True), "xml"))

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
        #: The destination's completed job, as Finish's reply carried it.
        self.completed: dict[str, Any] | None = None

    async def prepare(
        self, xml: str, cookie: str | None, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        call = mc.prepare(xml, cookie, int(flags), params.to_dict(), self.session)
        reply = await self.client.fetch(call)
        uri = answer_field(self.client, call, reply, "uri")
        return uri, answer_field(self.client, call, reply, "cookie")

    async def finish(self, name: str, cookie: str | None, *, cancelled: bool, v3: bool) -> str:
        call = mc.finish(name, cookie, cancelled, v3)
        reply = await self.client.fetch(call)
        if not cancelled:
            self.completed = completed_stats(reply)
        return str(answer_field(self.client, call, reply, "cookie", ""))

    async def state(self, name: str) -> tuple[str, str]:
        call = calls.dominfo(name)
        info = await self.client.fetch(call)
        job = answer_field(self.client, call, info, "job", {})
        state = answer_field(self.client, call, info, "state")
        return str(state), str(job.get("async_job", "none"))


class MigrationReport:
    """What a finished migration cost, for the CLI's table and the benchmark.

    A plain class: ``vmferry migrate`` does not import ``dataclasses`` (issue 10).
    """

    def __init__(
        self,
        wall_s: float = 0.0,
        steps: dict[str, float] | None = None,
        stats: dict[str, object] | None = None,
        migration_id: str = "",
    ) -> None:
        self.wall_s = wall_s
        self.steps: dict[str, float] = steps if steps is not None else {}
        self.stats: dict[str, object] = stats if stats is not None else {}
        #: The id both daemons' log lines of this migration carry (``grep`` it).
        self.migration_id = migration_id

    def __repr__(self) -> str:
        return (
            f"MigrationReport(wall_s={self.wall_s!r}, steps={self.steps!r}, "
            f"stats={self.stats!r}, migration_id={self.migration_id!r})"
        )


def start_migration(
    params: MigrationParams | None,
    flags: MigrateFlags,
    name: str,
    src_uri: str,
    dest_uri: str,
    *,
    p2p: bool = False,
) -> MigrationParams:
    """
    *params* checked and given the migration's id; the start logged.

    :raise VmferryError: ``INVALID_ARG`` for parameters *flags* do not allow, or a
        tunnelled migration the client would run (only the daemons carry a tunnel).
    """
    params = with_migration_id(params)
    params.validate(flags)
    if flags & MigrateFlags.TUNNELLED and not p2p:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            "a tunnelled migration is peer-to-peer: the daemons carry the stream (use --p2p)",
        )
    # The id in the text too: a program's own log format shows it without vmferry.logs.
    how = " (peer-to-peer)" if p2p else ""
    log.info("migration %s: %s from %s to %s%s", params.migration_id, name, src_uri, dest_uri, how)
    return params


def p2p_report(
    src: Daemon, call: Call[Any], result: Any, started: float, migration_id: str
) -> MigrationReport:
    """The report of a peer-to-peer migration: the source daemon's answer (*result*) to *call*."""
    steps = answer_field(src, call, result, "steps", {})
    stats = answer_field(src, call, result, "stats", {})
    return MigrationReport(
        wall_s=time.perf_counter() - started,
        steps={str(k): float(v) for k, v in steps.items()},
        stats=dict(stats),
        migration_id=migration_id,
    )


def with_migration_id(params: MigrationParams | None) -> MigrationParams:
    """A copy of *params* with an id (a new one unless the caller chose it), bound for logging."""
    params = (params or MigrationParams()).copy()
    params.migration_id = params.migration_id or new_migration_id()
    bind_migration(params.migration_id)
    return params


async def job_stats(client: Daemon, name: str, completed: bool = True) -> dict[str, Any]:
    """The ``stats`` of *name*'s job on *client*'s daemon (``GET .../jobinfo``)."""
    call = mc.jobinfo(name, completed=completed)
    stats = await fetch_field(client, call, "stats", {})
    return dict(stats) if isinstance(stats, dict) else {}


async def completed_or_none(client: Daemon, name: str) -> dict[str, Any]:
    try:
        return await job_stats(client, name)
    except VmferryError:
        return {}


async def report_stats(
    source: RemoteSource, dest: RemoteDestination, name: str, dest_name: str
) -> dict[str, Any]:
    """
    Both sides' figures of the completed migration.

    The destination knows both sides' figures (the source's came in the cookie),
    the source the downtime the guest saw and its policy's actions (all of it in
    v2, which has no cookies).  Finish's and Confirm's replies carry them; a side
    whose reply did not (v2 has no Confirm; an older daemon) is asked with jobinfo.
    """
    source_stats = source.completed
    if source_stats is None:
        source_stats = await completed_or_none(source.client, name)
    dest_stats = dest.completed
    if dest_stats is None:
        dest_stats = await job_stats(dest.client, dest_name)
    return {**source_stats, **dest_stats}
