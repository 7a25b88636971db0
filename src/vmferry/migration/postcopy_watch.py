"""Post-copy supervision: standing by a migration from its switch-over until its job ends.

Once QEMU switched over, neither side may be killed or resumed: the source
watches its stream (:func:`watch_outgoing`): it pauses a stream that went
silent, marks the job ``postcopy_failed``, and resumes it peer-to-peer by
itself whenever the destination daemon answers (unless
``postcopy_autoresume`` is off); a destination whose Finish failed in
post-copy completes the migration when QEMU does (:func:`watch_incoming`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from vmferry.errors import VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration import destination, p2p, peer_probe, postcopy, source
from vmferry.migration.flags import MigrateFlags, parse_flags
from vmferry.migration.host import MigrationHost
from vmferry.migration.params import MigrationParams
from vmferry.migration.phase import MigrationPhase
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import MigrationStatus

log = logging.getLogger(__name__)

#: Resume attempts: first after FIRST_RESUME_S, doubling up to MAX_RESUME_S.
FIRST_RESUME_S = 0.5
MAX_RESUME_S = 5.0


class PostcopyWatch:
    """The post-copy watchers of one host: at most one per domain."""

    def __init__(self, host: MigrationHost) -> None:
        self._host = host
        self._watched: set[str] = set()  # uuids with a watcher running

    def watch(self, dom: QemuDomain) -> None:
        """Watch *dom*'s post-copy migration until its job ends (once per domain)."""
        host = self._host
        if dom.uuid in self._watched or not dom.active:
            return
        if dom.job.async_job == AsyncJob.MIGRATION_OUT:
            ka = host.keepalive
            watch = watch_outgoing(
                host,
                dom,
                interval=ka.interval if ka.interval > 0 else 5.0,
                stall_checks=ka.count,
            )
        elif dom.job.async_job == AsyncJob.MIGRATION_IN:
            watch = watch_incoming(host, dom)
        else:
            return
        self._watched.add(dom.uuid)

        async def run() -> None:
            try:
                await watch
            finally:
                self._watched.discard(dom.uuid)

        host.spawn(run())


async def resume_attempt(host: MigrationHost, dom: QemuDomain) -> bool:
    """One automatic resume of *dom*'s failed post-copy migration, peer-to-peer.

    True when the migration resumed and completed; False when there is no peer,
    the administrator turned ``postcopy_autoresume`` off, the peer does not
    answer, or the resume failed.
    """
    peer = host.migration_peers.get(dom.uuid)
    params = dom.migration.params or MigrationParams()
    if peer is None or not params.postcopy_autoresume:
        return False
    if not await peer_probe.answers(host, peer):
        return False
    flags = MigrateFlags(dom.migration.flags) | MigrateFlags.POSTCOPY_RESUME
    flags &= ~(MigrateFlags.PEER2PEER | MigrateFlags.CHANGE_PROTECTION)
    log.info("domain %s: %s answers again: resuming post-copy", dom.name, peer.uri)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await p2p.migrate(host, dom.name, peer.uri, parse_flags(int(flags)), params.copy())
    except VmferryError as err:
        log.warning("domain %s: resuming post-copy failed: %s", dom.name, err.message)
        return False
    log.info(
        "domain %s: post-copy resumed and completed in %.2f s", dom.name, loop.time() - started
    )
    return True


async def watch_outgoing(
    host: MigrationHost, dom: QemuDomain, *, interval: float, stall_checks: int
) -> None:
    """Stand by an outgoing migration from its switch to post-copy until its job ends.

    Every *interval* seconds, while no API owns the job:

    * a stream that moved nothing for *stall_checks* looks in a row is
      paused (``migrate-pause``): a cut link leaves TCP silent for many
      minutes, and only a paused stream can be resumed;
    * a broken stream (``postcopy-paused``) marks the job ``postcopy_failed``;
    * a failed job is resumed (:func:`resume_attempt`), retried with a
      growing delay while it fails;
    * a failed job QEMU completed anyway is completed here (the source killed).
    """
    loop = asyncio.get_running_loop()
    last, still = -1, 0
    retry_at, delay = 0.0, FIRST_RESUME_S

    def ended() -> bool:
        return not dom.active or dom.job.async_job is not AsyncJob.MIGRATION_OUT

    try:
        while not ended():
            await dom.wait_for(
                lambda: (
                    ended()
                    or dom.migration.status
                    in (MigrationStatus.COMPLETED, MigrationStatus.POSTCOPY_PAUSED)
                ),
                interval,
            )
            await asyncio.sleep(0)  # let the step that waits for the same event go first
            job, status = dom.job, dom.migration.status
            if ended():
                break
            if job.owned:
                last, still = -1, 0
                await asyncio.sleep(interval)
                continue
            if status == MigrationStatus.COMPLETED:
                if job.phase == MigrationPhase.POSTCOPY_FAILED:
                    await source.complete_unattended(host, dom)
                    break
                await asyncio.sleep(interval)  # Confirm comes
                continue
            if status == MigrationStatus.POSTCOPY_ACTIVE:
                moved = await _transferred(dom)
                still = still + 1 if moved is not None and moved == last else 0
                last = moved if moved is not None else last
                if still >= stall_checks:
                    log.warning(
                        "domain %s: post-copy stream moved nothing for %.1f s: pausing it",
                        dom.name,
                        still * interval,
                    )
                    still = 0
                    with contextlib.suppress(VmferryError):
                        await postcopy.pause(dom)
                continue  # paced by the wait above: no event comes while it streams
            last, still = -1, 0
            if status != MigrationStatus.POSTCOPY_PAUSED:
                await asyncio.sleep(interval)
                continue
            if job.phase in (MigrationPhase.PERFORM3_DONE, MigrationPhase.CONFIRM3_CANCELLED):
                postcopy.mark_failed(dom)
            if job.phase != MigrationPhase.POSTCOPY_FAILED:
                await asyncio.sleep(interval)
                continue
            if loop.time() < retry_at:
                await asyncio.sleep(min(interval, retry_at - loop.time()))
                continue
            if await resume_attempt(host, dom):
                delay = FIRST_RESUME_S
            else:
                retry_at, delay = loop.time() + delay, min(delay * 2, MAX_RESUME_S)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("domain %s: watching the post-copy migration failed", dom.name)


async def _transferred(dom: QemuDomain) -> int | None:
    """Bytes the stream moved so far; None when it cannot tell or nothing is left to move."""
    mon = dom.monitor
    if mon is None or not mon.connected:
        return None
    try:
        info = await mon.execute("query-migrate")
    except VmferryError:
        return None
    ram = info.get("ram", {}) if isinstance(info, dict) else {}
    if not isinstance(ram, dict) or not ram.get("remaining", 1):
        return None
    return int(ram.get("transferred", 0))


async def watch_incoming(host: MigrationHost, dom: QemuDomain, *, interval: float = 1.0) -> None:
    """Complete a failed incoming post-copy migration that QEMU completes unattended."""

    def ended() -> bool:
        return not dom.active or dom.job.async_job is not AsyncJob.MIGRATION_IN

    try:
        while not ended():
            await dom.wait_for(
                lambda: ended() or dom.migration.status == MigrationStatus.COMPLETED, interval
            )
            await asyncio.sleep(0)
            if ended():
                break
            job = dom.job
            if (
                dom.migration.status == MigrationStatus.COMPLETED
                and not job.owned
                and job.phase == MigrationPhase.POSTCOPY_FAILED
            ):
                await destination.complete_unattended(host, dom)
                break
            await asyncio.sleep(interval)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("domain %s: watching the incoming post-copy migration failed", dom.name)
