"""Peer-to-peer migration: the source daemon runs the whole protocol itself.

libvirt's ``qemuMigrationSrcPerformPeer2Peer`` (qemu_migration.c): the source
opens a connection to the destination daemon (here through the host's
:class:`~vmferry.migration.host.PeerConnector`), holds a session there, runs
v3 (or v2) with its own steps called in-process, and probes the destination
with keepalives so a dead peer is noticed in bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from typing import TypeVar

from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration import postcopy, resolver, source
from vmferry.migration.cookie import same_uuid
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost, PeerConnection
from vmferry.migration.params import MigrationParams
from vmferry.migration.peer_probe import MigrationPeer
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.protocol import DestinationSide, StepTimes, migrate_v2, migrate_v3
from vmferry.migration.tunnel import Sender
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Every call to another daemon is bounded (Finish's own minimum is longer: it waits for
#: the stream).
PEER_CALL_TIMEOUT_S = 60.0


async def migrate(
    host: MigrationHost, name: str, dest_uri: str, flags: MigrateFlags, params: MigrationParams
) -> StepTimes:
    """Run the whole protocol from here against the destination daemon at *dest_uri*."""
    flags &= ~MigrateFlags.PEER2PEER
    times = StepTimes()
    dom = host.lookup(name)
    await host.check_peer(dest_uri, "destination")
    async with host.peers.connect(dest_uri, timeout=PEER_CALL_TIMEOUT_S) as dconn:
        info = await dconn.host()
        if same_uuid(info.uuid, host.host_uuid):
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"Attempt to migrate guest to the same host {info.uuid}",
            )
        # Recorded before Begin persists the job: recovery must know whom to ask.
        host.migration_peers[dom.uuid] = MigrationPeer(
            uri=dest_uri, name=params.dname or name, host_uuid=info.uuid
        )
        dead = asyncio.Event()
        keepalive = asyncio.create_task(_keepalive(host, dconn, dom, dead))
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(PEER_CALL_TIMEOUT_S):
                    remote = await stack.enter_async_context(dconn.destination())
                dst = _WatchedDestination(remote, dead, dest_uri)
                run = migrate_v3 if "migration-v3" in info.features else migrate_v2
                tunnel = None
                if flags & MigrateFlags.TUNNELLED:
                    dest_name = params.dname or name

                    async def tunnel(qemu: socket.socket, stream: str) -> None:
                        await dconn.tunnel(dest_name, qemu, stream)

                await run(LocalSource(host, tunnel), dst, name, flags, params, times=times)
        except TimeoutError:
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"destination host {dest_uri} did not open a session within "
                f"{PEER_CALL_TIMEOUT_S:g} s",
            ) from None
        except VmferryError as err:
            _settle_failure(host, dom)
            if dead.is_set():
                ka = host.keepalive
                raise VmferryError(
                    ErrorCode.OPERATION_FAILED,
                    f"lost connection to destination host {dest_uri}: no answer to "
                    f"{ka.count} keepalives {ka.interval:g} s apart ({err.message})",
                ) from err
            raise
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
    return times


class LocalSource:
    """The source side of the protocol, called in-process."""

    def __init__(self, host: MigrationHost, tunnel: Sender | None = None) -> None:
        self._host = host
        self._tunnel = tunnel  # tunnelled: sends the stream to the destination daemon

    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        return await self._host.source_begin(self._host.lookup(name), flags, params)

    async def perform(self, name: str, cookie: str, uri: str) -> str:
        return await self._host.source_perform(
            self._host.lookup(name), cookie, uri, tunnel=self._tunnel
        )

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None:
        await self._host.source_confirm(self._host.lookup(name), cookie, cancelled=cancelled)

    async def dumpxml(self, name: str) -> str:
        return self._host.dumpxml(self._host.lookup(name), migratable=True, inactive=False)

    async def perform2(
        self, name: str, uri: str, flags: MigrateFlags, params: MigrationParams
    ) -> None:
        await source.perform2(self._host, self._host.lookup(name), uri, flags, params)


async def _keepalive(
    host: MigrationHost, dconn: PeerConnection, dom: QemuDomain, dead: asyncio.Event
) -> None:
    """libvirt's keepalive on the p2p connection: declare the destination dead in bounded time.

    Probes the peer's host every ``keepalive.interval`` s; after ``keepalive.count``
    probes in a row without an answer, sets *dead* (every pending call to the
    destination fails) and cancels a migration whose data is moving.
    """
    interval, count = host.keepalive.interval, host.keepalive.count
    if interval <= 0:
        return
    loop = asyncio.get_running_loop()
    misses = 0
    while misses < count:
        started = loop.time()
        try:
            await dconn.host(request_timeout=interval)
            misses = 0
        except VmferryError as err:
            misses += 1
            log.warning("keepalive %d/%d to %s failed: %s", misses, count, dconn.uri, err.message)
        await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
    log.error("destination %s is dead: no keepalive answer %d times", dconn.uri, count)
    dead.set()
    if dom.job.async_job == AsyncJob.MIGRATION_OUT and dom.job.phase == MigrationPhase.PERFORM3:
        with contextlib.suppress(VmferryError):
            await host.job_abort(dom)


def _settle_failure(host: MigrationHost, dom: QemuDomain) -> None:
    """A failed p2p run may leave the source in perform3_done (Finish's answer lost)."""
    job = dom.job
    if job.async_job != AsyncJob.MIGRATION_OUT or job.owned:
        return
    if postcopy.in_postcopy(dom):
        # Past the switch-over: nothing to resolve, the job is kept for a resume.
        if dom.active:
            postcopy.mark_failed(dom)
        host.postcopy_watch.watch(dom)
    elif job.phase == MigrationPhase.PERFORM3_DONE:
        resolver.settle(host, dom)


class _WatchedDestination:
    """The destination side of a p2p migration, failing fast once the keepalive gave up."""

    def __init__(self, inner: DestinationSide, dead: asyncio.Event, uri: str) -> None:
        self._inner = inner
        self._dead = dead
        self._uri = uri

    async def _call(self, call: Awaitable[T]) -> T:
        task = asyncio.ensure_future(call)
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            dead.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise VmferryError(
            ErrorCode.RPC_FAILED,
            f"lost connection to destination host {self._uri}: it stopped answering keepalives",
        )

    async def prepare(
        self, xml: str, cookie: str | None, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        return await self._call(self._inner.prepare(xml, cookie, flags, params))

    async def finish(self, name: str, cookie: str | None, *, cancelled: bool, v3: bool) -> str:
        return await self._call(self._inner.finish(name, cookie, cancelled=cancelled, v3=v3))

    async def state(self, name: str) -> tuple[str, str]:
        return await self._call(self._inner.state(name))
