"""Resolving a migration that a daemon restart interrupted.

libvirt's ``qemuProcessRecoverMigrationOut`` / ``qemuProcessRecoverMigrationIn``:
after the daemon re-attached to a live QEMU, the persisted phase of the job
decides what happens to the guest. The table, as built here:

======================  ==========================================================
source phase            action
======================  ==========================================================
``begin3``              nothing was touched: drop the job
``perform2/perform3``   ``migrate_cancel`` (wait until QEMU says it is over), reset
                        the parameters, resume the guest if it was running
                        (``migration-canceled``), drop the job
``perform3_done``       Finish's outcome is unknown: ask the destination daemon
                        (:func:`resolve_outgoing`); libvirt leaves the guest paused
``perform2``, QEMU      v2 has no Confirm and the destination keeps a complete v2
says completed          stream: ask the destination too (libvirt resumes here)
``confirm3_cancelled``  resume the guest, drop the job
``confirm3``            the guest runs on the destination: kill the source
                        (shut off ``migrated``), undefine it with --undefinesource
post-copy: ``perform3_  keep the job (libvirt's "return 1", below)
done``, ``confirm3_
cancelled``, resume
phases
======================  ==========================================================

======================  ==========================================================
destination phase       action
======================  ==========================================================
``prepare``             kill the incoming QEMU, except a v2 one whose stream
                        completed: like ``finish2``
``finish2``             the v2 source is gone: ``cont`` if the stream completed
                        (else kill), drop the job
``finish3``             running already: keep it, drop the job; else kill
post-copy: any phase    keep the job (libvirt's "return 1", below)
once QEMU switched
over
======================  ==========================================================

**Post-copy ("return 1").** Once QEMU switched over, neither side may be
killed or resumed: the job is kept in phase ``postcopy_failed``, unowned. A
stream QEMU already completed is finished at once (the source killed, the
destination running ``migrated``); a stream still flowing completes
unattended (:func:`watch_outgoing`, :func:`watch_incoming`); a broken one is
marked failed (source paused, destination running, reason
``post-copy-failed``) and waits for a resume, which the source's watcher
attempts by itself while the destination answers.

Where libvirt leaves the source paused (``perform3_done``), vmferry asks the
peer daemon whether the guest arrived: running there with no incoming job
means the migration succeeded (kill the source as Confirm would); no such
domain, or shut off there, means it never took over (resume here); still in
its incoming job means ask again later. While the peer cannot be reached the
guest stays paused with reason ``migration-unresolved`` and the question is
repeated, at most :data:`RETRY_INTERVAL_S` seconds apart. The same resolver settles a
client-managed migration whose client went away after Perform, and a
peer-to-peer one whose Finish answer was lost.

A domain whose QEMU did not survive the restart is already shut off
(crashed) by then; :func:`recover_gone` only completes what a ``confirm3``
would have done to its definition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vmferry.domain.state import DomainState, EventType, PausedReason, RunningReason
from vmferry.errors import VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration import destination, postcopy, source
from vmferry.migration import params as mparams
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost
from vmferry.migration.phase import MigrationPhase

# The source's own Confirm actions, reused so recovery does exactly what Confirm would.
from vmferry.migration.source import complete_outgoing, restore_source
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)

#: Owner API of the job while recovery or the resolver handles it.
RECOVERY_API = "migration-recovery"
RESOLVE_API = "migration-resolve"

#: How often an unresolved outgoing migration asks the destination again: first
#: after FIRST_RETRY_S, doubling up to RETRY_INTERVAL_S.
FIRST_RETRY_S = 0.25
RETRY_INTERVAL_S = 2.0
#: The starter of a v2 incoming job (Prepare without a cookie).
V2_PREPARE_API = destination.PREPARE2_API
#: How long recovery waits for QEMU to end a cancelled migration.
CANCEL_WAIT_S = 10.0

_OVER = frozenset({"none", "completed", "failed", "cancelled"})


class PeerAnswer(StrEnum):
    """What the destination daemon says about the guest."""

    ARRIVED = "arrived"  # active there, no incoming job: the migration succeeded
    ABSENT = "absent"  # no such domain, or shut off there: it never took over
    BUSY = "busy"  # still in its incoming job: ask again later
    UNREACHABLE = "unreachable"  # no answer that can be trusted


#: Asks the destination daemon once; provided by the daemon (it owns the client).
PeerProbe = Callable[[], Awaitable[PeerAnswer]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]
#: Takes over a post-copy job that recovery kept (the daemon starts its watcher).
KeepPostcopy = Callable[[QemuDomain], None]
#: One attempt to resume a failed post-copy migration; True when it completed.
ResumeAttempt = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class MigrationPeer:
    """Where an outgoing migration went: the destination daemon and the domain's name there."""

    uri: str
    name: str
    host_uuid: str = ""  # from Prepare's cookie: the daemon at *uri* must be that host

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "name": self.name, "host_uuid": self.host_uuid}

    @classmethod
    def from_dict(cls, data: Any) -> MigrationPeer | None:
        if not isinstance(data, dict) or not data.get("uri") or not data.get("name"):
            return None
        return cls(str(data["uri"]), str(data["name"]), str(data.get("host_uuid", "")))


def classify(state: str, async_job: str, *, same_uuid: bool) -> PeerAnswer:
    """The :class:`PeerAnswer` for the destination domain's *state* and *async_job*."""
    if not same_uuid:
        return PeerAnswer.ABSENT  # a different guest of that name: ours is not there
    if async_job == AsyncJob.MIGRATION_IN:
        return PeerAnswer.BUSY
    if state in (DomainState.RUNNING, DomainState.PAUSED):
        return PeerAnswer.ARRIVED
    return PeerAnswer.ABSENT


# -- status persistence ---------------------------------------------------------------------------


def bookkeeping(dom: QemuDomain) -> dict[str, Any]:
    """The part of ``dom.migration`` a restarted daemon needs (goes into the status file)."""
    m = dom.migration
    return {
        "flags": m.flags,
        "params": dict(m.params),
        "was_running": m.was_running,
        "created_here": m.created_here,
        "port": m.port,
        "origin_name": m.origin_name,
    }


def restore_bookkeeping(dom: QemuDomain, data: Any) -> None:
    """Put :func:`bookkeeping` back into ``dom.migration`` (absent data: leave the defaults)."""
    if not isinstance(data, dict):
        return
    m = dom.migration
    m.flags = int(data.get("flags", 0))
    params = data.get("params")
    m.params = dict(params) if isinstance(params, dict) else {}
    m.was_running = bool(data.get("was_running", False))
    m.created_here = bool(data.get("created_here", False))
    m.origin_name = str(data.get("origin_name", ""))
    # The port was held by the daemon that died; this one never reserved it.
    m.port = 0


# -- recovery -------------------------------------------------------------------------------------


async def recover(
    host: MigrationHost,
    dom: QemuDomain,
    *,
    probe: PeerProbe | None,
    spawn: Spawn,
    keep_postcopy: KeepPostcopy | None = None,
) -> None:
    """Resolve the restored migration job of *dom*, whose QEMU is back under control.

    The job must have been restored (:meth:`~vmferry.jobs.DomainJob.restore`)
    and not be owned. On return the job has ended, except in ``perform3_done``
    with a known peer: then *spawn* got :func:`resolve_outgoing`, which owns
    the job until the destination answers.
    """
    job, phase = dom.job.async_job, dom.job.phase
    if job not in (AsyncJob.MIGRATION_OUT, AsyncJob.MIGRATION_IN) or not isinstance(
        phase, MigrationPhase
    ):
        log.warning("domain %s: dropping interrupted job '%s'", dom.name, job)
        dom.job.finish_async()
        return
    log.info("domain %s: recovering %s job in phase %s", dom.name, job, phase.label)
    dom.job.start_phase(job, phase, RECOVERY_API)
    dom.bound_session = ""  # the sessions died with the old daemon
    kept = False
    try:
        await _refresh_status(dom)
        if _keeps_postcopy(dom, phase):
            kept = handed_over = await _keep_postcopy(host, dom)
        elif job is AsyncJob.MIGRATION_OUT:
            handed_over = await _recover_out(host, dom, phase, probe, spawn)
        else:
            await _recover_in(host, dom, phase)
            handed_over = False
    except Exception:
        log.exception("domain %s: recovery of %s failed; guest left as it is", dom.name, job)
        handed_over = False
    if not handed_over:
        dom.job.finish_async()
    elif kept and keep_postcopy is not None:
        keep_postcopy(dom)


def _keeps_postcopy(dom: QemuDomain, phase: MigrationPhase) -> bool:
    """Whether *phase* is one where a switched-over migration must be kept (libvirt's 1)."""
    if phase.is_resume:
        return True
    if not postcopy.in_postcopy(dom):
        return False
    if dom.job.async_job is AsyncJob.MIGRATION_OUT:
        # perform3: the destination never resumed the guest (Finish comes after Perform
        # returned), so the source can still take it back: cancelled as in pre-copy.
        return phase in (MigrationPhase.PERFORM3_DONE, MigrationPhase.CONFIRM3_CANCELLED)
    return True  # the destination: prepare or finish3, QEMU switched over


async def _keep_postcopy(host: MigrationHost, dom: QemuDomain) -> bool:
    """Keep a post-copy job across the restart; False when it could be completed at once."""
    status = dom.migration.status
    log.info("domain %s: post-copy migration kept across the restart (QEMU: %s)", dom.name, status)
    if status == "completed":
        if dom.job.async_job is AsyncJob.MIGRATION_OUT:
            dom.job.set_phase(MigrationPhase.CONFIRM_RESUME)
            await complete_outgoing(host, dom, MigrateFlags(dom.migration.flags))
        else:
            dom.job.set_phase(MigrationPhase.FINISH_RESUME)
            await destination.complete_incoming(host, dom)
        return False
    if status in postcopy.ALIVE_STATES:
        # Still streaming: the watcher completes it when QEMU does.
        dom.job.set_phase(MigrationPhase.POSTCOPY_FAILED)
    else:
        postcopy.mark_failed(dom)
    dom.job.continue_(cleanup=postcopy.end_job(dom))
    return True


# -- post-copy watchers ---------------------------------------------------------------------------

#: Resume attempts: first after FIRST_RESUME_S, doubling up to MAX_RESUME_S.
FIRST_RESUME_S = 0.5
MAX_RESUME_S = 5.0


async def watch_outgoing(
    host: MigrationHost,
    dom: QemuDomain,
    *,
    interval: float,
    stall_checks: int,
    resume: ResumeAttempt | None,
) -> None:
    """Stand by an outgoing migration from its switch to post-copy until its job ends.

    Every *interval* seconds, while no API owns the job:

    * a stream that moved nothing for *stall_checks* looks in a row is
      paused (``migrate-pause``): a cut link leaves TCP silent for many
      minutes, and only a paused stream can be resumed;
    * a broken stream (``postcopy-paused``) marks the job ``postcopy_failed``;
    * a failed job is resumed by *resume* (None: wait for ``--postcopy-resume``),
      retried with a growing delay while it fails;
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
                lambda: ended() or dom.migration.status in ("completed", "postcopy-paused"),
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
            if status == "completed":
                if job.phase == MigrationPhase.POSTCOPY_FAILED:
                    await source.complete_unattended(host, dom)
                    break
                await asyncio.sleep(interval)  # Confirm comes
                continue
            if status == "postcopy-active":
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
            if status != "postcopy-paused":
                await asyncio.sleep(interval)
                continue
            if job.phase in (MigrationPhase.PERFORM3_DONE, MigrationPhase.CONFIRM3_CANCELLED):
                postcopy.mark_failed(dom)
            if job.phase != MigrationPhase.POSTCOPY_FAILED or resume is None:
                await asyncio.sleep(interval)
                continue
            if loop.time() < retry_at:
                await asyncio.sleep(min(interval, retry_at - loop.time()))
                continue
            if await resume():
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
            await dom.wait_for(lambda: ended() or dom.migration.status == "completed", interval)
            await asyncio.sleep(0)
            if ended():
                break
            job = dom.job
            if (
                dom.migration.status == "completed"
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


async def recover_gone(host: MigrationHost, dom: QemuDomain) -> None:
    """The restored job's QEMU is gone (already marked shut off): finish what is left."""
    phase = dom.job.phase
    flags = MigrateFlags(dom.migration.flags)
    if (
        dom.job.async_job is AsyncJob.MIGRATION_OUT
        and phase == MigrationPhase.CONFIRM3
        and flags & MigrateFlags.UNDEFINE_SOURCE
        and dom.persistent is not None
    ):
        host.unpersist_definition(dom)
        host.lifecycle.emit(dom, EventType.UNDEFINED, "removed", {})
    dom.job.finish_async()
    if dom.persistent is None and not dom.active:
        host.remove(dom)


async def _refresh_status(dom: QemuDomain) -> None:
    # libvirt's qemuMigrationAnyRefreshStatus: the events of the lost time are gone.
    info = await dom.require_monitor().execute("query-migrate")
    dom.migration.status = str(info.get("status", "none")) if isinstance(info, dict) else "none"


async def _recover_out(
    host: MigrationHost,
    dom: QemuDomain,
    phase: MigrationPhase,
    probe: PeerProbe | None,
    spawn: Spawn,
) -> bool:
    """Source side; True when the job was handed to the resolver."""
    flags = MigrateFlags(dom.migration.flags)
    if phase == MigrationPhase.BEGIN3:
        pass
    elif phase == MigrationPhase.PERFORM2 and dom.migration.status == "completed":
        # v2 has no Confirm: a completed stream may already run there (Finish2, or the
        # destination's own recovery), or have been discarded. Only the peer can tell.
        return start_resolver(host, dom, probe, spawn)
    elif phase in (MigrationPhase.PERFORM2, MigrationPhase.PERFORM3):
        # v3: the destination never got a successful Finish, Perform did not return.
        await _cancel(dom)
        await _resume(dom, flags)
    elif phase == MigrationPhase.PERFORM3_DONE:
        return start_resolver(host, dom, probe, spawn)
    elif phase == MigrationPhase.CONFIRM3_CANCELLED:
        await _resume(dom, flags)
    elif phase == MigrationPhase.CONFIRM3:
        await complete_outgoing(host, dom, flags)
    else:
        log.error("domain %s: cannot recover migration phase %s", dom.name, phase.label)
    return False


async def _recover_in(host: MigrationHost, dom: QemuDomain, phase: MigrationPhase) -> None:
    v2 = phase == MigrationPhase.FINISH2 or dom.job.async_started_by == V2_PREPARE_API
    if v2 and phase != MigrationPhase.FINISH3 and dom.migration.status == "completed":
        # v2: the whole guest arrived and Perform2 kills the source once it sent it all; a
        # v2 source that was interrupted asks here first (see _recover_out).
        if dom.state != DomainState.RUNNING:
            dom.pending_resume_reason = RunningReason.MIGRATED
            await dom.require_monitor().execute("cont")
            await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
        return
    if phase == MigrationPhase.FINISH3 and dom.state == DomainState.RUNNING:
        if dom.reason == RunningReason.UNKNOWN:
            dom.set_state(DomainState.RUNNING, RunningReason.MIGRATED)
        return
    # Prepare, or a Finish that had not resumed the guest: it never ran here.
    await destination.discard_incoming(host, dom)


async def _cancel(dom: QemuDomain) -> None:
    """migrate_cancel and wait until QEMU reports the migration over."""
    if dom.migration.status in _OVER:
        return
    mon = dom.require_monitor()
    await mon.execute("migrate_cancel")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_WAIT_S
    while dom.migration.status not in _OVER and loop.time() < deadline:
        # Events drive the status; the poll covers an event lost around the reconnect.
        await dom.wait_for(lambda: dom.migration.status in _OVER, 0.5)
        await _refresh_status(dom)
    if dom.migration.status not in _OVER:
        log.error(
            "domain %s: migration still %s after migrate_cancel", dom.name, dom.migration.status
        )


async def _resume(dom: QemuDomain, flags: MigrateFlags) -> None:
    """Back to how the guest was before the migration: parameters reset, running if it was."""
    if dom.state == DomainState.PAUSED and dom.reason not in (
        PausedReason.MIGRATION,
        PausedReason.UNKNOWN,
        PausedReason.MIGRATION_UNRESOLVED,
    ):
        # Paused for another reason (by the user meanwhile): not the migration's to undo.
        await _reset_params(dom, flags)
        return
    await restore_source(dom, flags)
    if (
        not dom.migration.was_running
        and dom.state == DomainState.PAUSED
        and dom.reason in (PausedReason.MIGRATION, PausedReason.MIGRATION_UNRESOLVED)
    ):
        dom.set_state(DomainState.PAUSED, PausedReason.USER)  # paused before it migrated


async def _reset_params(dom: QemuDomain, flags: MigrateFlags) -> None:
    try:
        await mparams.reset(dom.require_monitor(), flags, source=True)
    except VmferryError as err:
        log.warning("domain %s: resetting migration parameters: %s", dom.name, err.message)


# -- the resolver ---------------------------------------------------------------------------------


def start_resolver(
    host: MigrationHost, dom: QemuDomain, probe: PeerProbe | None, spawn: Spawn
) -> bool:
    """Settle an outgoing migration left in ``perform3_done`` whose job the caller owns.

    With a *probe*, hands the job to :func:`resolve_outgoing` (run by *spawn*)
    and returns True. Without one nobody can tell where the guest should run:
    it stays paused with reason ``migration-unresolved``, the job is left for
    the caller to end (libvirt's behaviour), and False is returned.
    """
    if probe is None:
        log.warning(
            "domain %s: outcome of the migration unknown and no destination to ask: "
            "guest stays paused (resume or destroy it once you know where it runs)",
            dom.name,
        )
        _mark_unresolved(dom)
        return False
    if dom.job.owned:
        dom.job.continue_()  # hand over: the resolver becomes the owner
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.PERFORM3_DONE, RESOLVE_API)
    spawn(resolve_outgoing(host, dom, probe))
    return True


def _mark_unresolved(dom: QemuDomain) -> None:
    if dom.state == DomainState.PAUSED and dom.reason != PausedReason.MIGRATION_UNRESOLVED:
        dom.set_state(DomainState.PAUSED, PausedReason.MIGRATION_UNRESOLVED)


async def resolve_outgoing(
    host: MigrationHost,
    dom: QemuDomain,
    probe: PeerProbe,
    *,
    interval: float = RETRY_INTERVAL_S,
) -> None:
    """Ask the destination until it tells where the guest runs, then act as Confirm would.

    Owns the migration-out job (phase ``perform3_done``) until it ends it. A
    ``domjobabort`` gives up: the job ends and the guest stays paused. When
    cancelled (daemon shutdown) the job is left persisted, so the next daemon
    resumes the question.
    """
    flags = MigrateFlags(dom.migration.flags)

    def interrupted() -> bool:
        return not dom.active or dom.job.abort_requested

    delay = min(FIRST_RETRY_S, interval)
    try:
        while not interrupted():
            answer = await probe()
            if interrupted():
                break
            if answer is PeerAnswer.ARRIVED:
                log.info("domain %s: the destination runs the guest: stopping it here", dom.name)
                dom.job.set_phase(MigrationPhase.CONFIRM3)
                await complete_outgoing(host, dom, flags)
                break
            if answer is PeerAnswer.ABSENT:
                log.info("domain %s: the guest never took over there: resuming it", dom.name)
                dom.job.set_phase(MigrationPhase.CONFIRM3_CANCELLED)
                await _resume(dom, flags)
                break
            if answer is PeerAnswer.UNREACHABLE:
                _mark_unresolved(dom)
            await dom.wait_for(interrupted, delay)
            delay = min(delay * 2, interval)
        if dom.job.abort_requested and dom.active:
            log.warning(
                "domain %s: resolving abandoned by domjobabort; guest stays paused", dom.name
            )
            _mark_unresolved(dom)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("domain %s: resolving the interrupted migration failed", dom.name)
    if dom.job.async_job is AsyncJob.MIGRATION_OUT:
        dom.job.finish_async()
