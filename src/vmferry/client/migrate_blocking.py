"""Client-managed and peer-to-peer migration on the blocking client, without an event loop.

What ``vmferry migrate`` runs.  The protocol (:mod:`vmferry.migration.protocol`)
is written as coroutines, but on a client whose calls block it never waits on
anything else: :func:`run_blocking` drives it to its end in one step, so the
CLI does not import asyncio (a third of the process's start-up, issue 10).
Same steps, same failure branches, same sessions as :func:`vmferry.client.migrate.migrate`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from vmferry.client import calls
from vmferry.client import migration_calls as mc
from vmferry.client.calls import Call
from vmferry.client.migrate_sides import (
    PROGRESS_POLL_S,
    MigrationReport,
    ProgressCallback,
    RemoteDestination,
    RemoteSource,
    job_stats,
    p2p_report,
    report_stats,
    start_migration,
)
from vmferry.errors import ErrorCode, VmferryError
from vmferry.logs import get_logger
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.protocol import StepTimes, migrate_v2, migrate_v3

if TYPE_CHECKING:
    from vmferry.client.http1 import SyncStream
    from vmferry.client.sync import Client

T = TypeVar("T")
P = ParamSpec("P")

log = get_logger(__name__)


def _own_context(func: Callable[P, T]) -> Callable[P, T]:
    """*func* run in a copy of the caller's context, as a task would be: the migration id
    bound for the logs does not outlive the call."""

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return contextvars.copy_context().run(func, *args, **kwargs)

    return run


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """
    Run *coro*, whose awaits all end in blocking calls, to its end.

    :raise VmferryError: ``INTERNAL_ERROR`` if it tried to wait on something (it
        would need an event loop); whatever *coro* raises otherwise.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise VmferryError(ErrorCode.INTERNAL_ERROR, "a blocking migration step waited on an event")


class BlockingDaemon:
    """A :class:`~vmferry.client.sync.Client` seen as the protocol's ``Daemon`` (awaits block)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @property
    def uri(self) -> str:
        return self.client.uri

    async def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        return self.client.fetch(call, request_timeout=request_timeout)

    async def open_stream(self, path: str) -> SyncStream:
        return self.client.open_stream(path)


@contextmanager
def open_sessions(src: Client, dst: Client) -> Iterator[tuple[str, str, list[str] | None]]:
    """
    A session on each daemon for as long as the block runs; yields both ids and the
    destination's features when its daemon sent them with the session (None: ask
    ``/v1/host``). Both requests are sent before either answer is read: one round
    trip's wait, not two.

    The connections stay open unread: the daemon writes one byte per keepalive,
    which fills no socket buffer, and sees the client go when the process does.
    """
    with ExitStack() as stack:
        src_sent = src.send_stream(mc.SESSION_PATH)
        stack.callback(src_sent.close)
        dst_sent = dst.send_stream(mc.SESSION_PATH)
        stack.callback(dst_sent.close)
        src_session, _ = _hello(src, src.stream_answer(src_sent, mc.SESSION_PATH))
        dst_session, features = _hello(dst, dst.stream_answer(dst_sent, mc.SESSION_PATH))
        yield src_session, dst_session, features


def _hello(client: Client, stream: SyncStream) -> tuple[str, list[str] | None]:
    """A session's first line: its id and the host's features (None: not sent)."""
    first = next(stream.iter_lines(), "")
    try:
        hello = json.loads(first)
        session = str(hello["session"])
    except (ValueError, KeyError, TypeError) as err:
        raise VmferryError(
            ErrorCode.INTERNAL_ERROR, f"unexpected session answer from {client.uri}: {first!r}"
        ) from err
    features = hello.get("features")
    return session, [str(f) for f in features] if isinstance(features, list) else None


@_own_context
def migrate(
    src: Client,
    dst: Client,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    *,
    version: int | None = None,
    progress: ProgressCallback | None = None,
    poll: bool = True,
) -> MigrationReport:
    """
    Migrate *name* from *src*'s host to *dst*'s, the client running the protocol.

    :param poll: Whether *progress* also gets the source job's figures while data
        moves (polled from a thread); steps are reported either way.
    """
    params = start_migration(params, flags, name, src.uri, dst.uri)
    started = time.perf_counter()
    times = StepTimes()
    src_d, dst_d = BlockingDaemon(src), BlockingDaemon(dst)
    with open_sessions(src, dst) as (src_session, dst_session, features):
        if version is None:
            if features is None:  # an older daemon: one more round trip
                features = dst.fetch(calls.host()).get("features") or []
            version = 3 if "migration-v3" in features else 2
        source = RemoteSource(src_d, src_session, peer_uri=dst.uri)
        dest = RemoteDestination(dst_d, dst_session)
        run = migrate_v3 if version == 3 else migrate_v2
        with _watch_progress(src_d, name, progress, poll, params.migration_id) as on_step:
            run_blocking(run(source, dest, name, flags, params, on_step=on_step, times=times))
    report = MigrationReport(
        wall_s=time.perf_counter() - started, steps=times.steps, migration_id=params.migration_id
    )
    report.stats = run_blocking(report_stats(source, dest, name, params.dname or name))
    log.info("migration %s: done in %.3f s", params.migration_id, report.wall_s)
    return report


@_own_context
def migrate_p2p(
    src: Client,
    dest_uri: str,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    *,
    progress: ProgressCallback | None = None,
    poll: bool = True,
) -> MigrationReport:
    """Ask *src*'s daemon to migrate *name* to *dest_uri* itself (peer-to-peer)."""
    params = start_migration(params, flags, name, src.uri, dest_uri, p2p=True)
    started = time.perf_counter()
    src_d = BlockingDaemon(src)
    with _watch_progress(src_d, name, progress, poll, params.migration_id) as on_step:
        on_step("perform")
        call = mc.migrate_p2p(name, dest_uri, int(flags), params.to_dict())
        result = src.fetch(call)
    return p2p_report(src_d, call, result, started, params.migration_id)


@contextmanager
def _watch_progress(
    src: BlockingDaemon, name: str, progress: ProgressCallback | None, poll: bool, mid: str
) -> Iterator[Callable[[str], None]]:
    """Report each step; with *poll*, the source's job statistics while data moves (a thread)."""
    if progress is None or not poll:

        def report(step: str) -> None:
            log.info("migration %s: %s", mid, step)
            if progress is not None:
                progress(step, None)

        # No thread: `threading` is not even imported (issue 10: the process's start).
        yield report
        return
    import threading

    lock = threading.Lock()  # the view is called from both threads
    current = {"step": ""}
    stop = threading.Event()

    def on_step(step: str) -> None:
        current["step"] = step
        log.info("migration %s: %s", mid, step)
        with lock:
            progress(step, None)

    def poller() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            if current["step"] != "perform":
                continue
            try:
                stats = run_blocking(job_stats(src, name, completed=False))
            except VmferryError:
                continue
            with lock:
                if not stop.is_set():
                    progress("perform", stats)

    threading.Thread(target=poller, name="vmferry-progress", daemon=True).start()
    try:
        yield on_step
    finally:
        stop.set()
        # Not joined: a poll in flight ends with the process; the view ignores it after stop.
