"""What a daemon restart does to an interrupted migration, phase by phase.

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
                        (:mod:`vmferry.migration.resolver`); libvirt leaves the guest paused
``perform2``, QEMU      v2 has no Confirm and the destination keeps a complete v2
says completed          stream: ask the destination too (libvirt resumes here)
``confirm3_cancelled``  resume the guest, drop the job (storage: any mirror left
                        over is cancelled, its NBD client node removed, in the
                        perform phases too)
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
``prepare``             kill the incoming QEMU (its NBD server goes with it) and
                        delete the disks this migration created, except a v2
                        one whose stream completed: like ``finish2``
``finish2``             the v2 source is gone: ``cont`` if the stream completed
                        (else kill), drop the job
``finish3``             running already: keep it (and the copied disks; the NBD
                        server stops), drop the job; else kill, as ``prepare``
post-copy: any phase    keep the job (libvirt's "return 1", below)
once QEMU switched
over
======================  ==========================================================

**Post-copy ("return 1").** Once QEMU switched over, neither side may be
killed or resumed: the job is kept in phase ``postcopy_failed``, unowned. A
stream QEMU already completed is finished at once (the source killed, the
destination running ``migrated``); a stream still flowing completes
unattended (:mod:`vmferry.migration.postcopy_watch`); a broken one is
marked failed (source paused, destination running, reason
``post-copy-failed``) and waits for a resume, which the source's watcher
attempts by itself while the destination answers.

In ``perform3_done`` the outcome is unknown: the resolver
(:mod:`vmferry.migration.resolver`) asks the destination daemon.

A domain whose QEMU did not survive the restart is already shut off
(crashed) by then; :func:`recover_gone` only completes what a ``confirm3``
would have done to its definition.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vmferry.domain.state import DomainState, EventType, PausedReason, RunningReason
from vmferry.errors import VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration import destination, postcopy, resolver, storage
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost
from vmferry.migration.params import MigrationParams
from vmferry.migration.phase import MigrationPhase

# The source's own Confirm actions, reused so recovery does exactly what Confirm would.
from vmferry.migration.source import complete_outgoing, retake_lease
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import TERMINAL, MigrationStatus

log = logging.getLogger(__name__)

#: Owner API of the job while recovery handles it.
RECOVERY_API = "migration-recovery"
#: The starter of a v2 incoming job (Prepare without a cookie).
V2_PREPARE_API = destination.PREPARE2_API
#: How long recovery waits for QEMU to end a cancelled migration.
CANCEL_WAIT_S = 10.0

_OVER = frozenset({MigrationStatus.NONE, *TERMINAL})


# -- status persistence ---------------------------------------------------------------------------


def bookkeeping(dom: QemuDomain) -> dict[str, Any]:
    """The part of ``dom.migration`` a restarted daemon needs (goes into the status file)."""
    m = dom.migration
    return {
        "flags": m.flags,
        "params": m.params.to_dict() if m.params is not None else {},
        "was_running": m.was_running,
        "created_here": m.created_here,
        "port": m.port,
        "origin_name": m.origin_name,
        "storage_disks": list(m.storage_disks),
        "created_volumes": list(m.created_volumes),
    }


def restore_bookkeeping(dom: QemuDomain, data: Any) -> None:
    """Put :func:`bookkeeping` back into ``dom.migration`` (absent data: leave the defaults)."""
    if not isinstance(data, dict):
        return
    m = dom.migration
    m.flags = int(data.get("flags", 0))
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        params = None  # none were ever set
    try:
        m.params = MigrationParams.from_dict(params) if params is not None else None
    except VmferryError as err:
        raise ValueError(f"migration parameters: {err.message}") from err
    m.was_running = bool(data.get("was_running", False))
    m.created_here = bool(data.get("created_here", False))
    m.origin_name = str(data.get("origin_name", ""))
    m.storage_disks = _strings(data.get("storage_disks"))
    m.created_volumes = _strings(data.get("created_volumes"))
    # The port was held by the daemon that died; this one never reserved it.
    m.port = 0


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return []
    return list(value)


# -- recovery -------------------------------------------------------------------------------------


async def recover(
    host: MigrationHost,
    dom: QemuDomain,
) -> None:
    """Resolve the restored migration job of *dom*, whose QEMU is back under control.

    The job must have been restored (:meth:`~vmferry.jobs.DomainJob.restore`)
    and not be owned. On return the job has ended, except in ``perform3_done``
    with a known peer: then the resolver owns the job until the destination
    answers; and a kept post-copy job, which its watcher takes over.
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
            handed_over = await _recover_out(host, dom, phase)
        else:
            await _recover_in(host, dom, phase)
            handed_over = False
    except Exception:
        log.exception("domain %s: recovery of %s failed; guest left as it is", dom.name, job)
        handed_over = False
    if not handed_over:
        dom.job.finish_async()
    elif kept:
        host.postcopy_watch.watch(dom)


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
    if status == MigrationStatus.COMPLETED:
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
    if dom.job.async_job is AsyncJob.MIGRATION_IN and phase == MigrationPhase.PREPARE:
        # The guest never ran here: the disks this migration created go.
        await storage.delete_created(host, dom)
        storage.forget(dom)
    dom.job.finish_async()
    if dom.persistent is None and not dom.active:
        host.remove(dom)


async def _refresh_status(dom: QemuDomain) -> None:
    # libvirt's qemuMigrationAnyRefreshStatus: the events of the lost time are gone.
    info = await dom.require_monitor().execute("query-migrate")
    dom.migration.status = MigrationStatus.of(info)


async def _recover_out(
    host: MigrationHost,
    dom: QemuDomain,
    phase: MigrationPhase,
) -> bool:
    """Source side; True when the job was handed to the resolver."""
    flags = MigrateFlags(dom.migration.flags)
    if phase == MigrationPhase.BEGIN3:
        # Nothing was sent: the guest stays here, and its lease (lost with the old daemon) too.
        if not await retake_lease(host, dom) and dom.state == DomainState.RUNNING:
            dom.pending_pause_reason = PausedReason.LEASE_LOST
            await dom.require_monitor().execute("stop")
    elif phase == MigrationPhase.PERFORM2 and dom.migration.status == MigrationStatus.COMPLETED:
        # v2 has no Confirm: a completed stream may already run there (Finish2, or the
        # destination's own recovery), or have been discarded. Only the peer can tell.
        return resolver.start(host, dom)
    elif phase in (MigrationPhase.PERFORM2, MigrationPhase.PERFORM3):
        # v3: the destination never got a successful Finish, Perform did not return.
        await _cancel(dom)
        await storage.cancel(dom)  # a mirror QEMU still runs: the source keeps its own disk
        await resolver.resume_source(dom, flags, host)
    elif phase == MigrationPhase.PERFORM3_DONE:
        return resolver.start(host, dom)
    elif phase == MigrationPhase.CONFIRM3_CANCELLED:
        await storage.cancel(dom)
        await resolver.resume_source(dom, flags, host)
    elif phase == MigrationPhase.CONFIRM3:
        await complete_outgoing(host, dom, flags)
    else:
        log.error("domain %s: cannot recover migration phase %s", dom.name, phase.label)
    return False


async def _recover_in(host: MigrationHost, dom: QemuDomain, phase: MigrationPhase) -> None:
    v2 = phase == MigrationPhase.FINISH2 or dom.job.async_started_by == V2_PREPARE_API
    if v2 and phase != MigrationPhase.FINISH3 and dom.migration.status == MigrationStatus.COMPLETED:
        # v2: the whole guest arrived and Perform2 kills the source once it sent it all; a
        # v2 source that was interrupted asks here first (see _recover_out).
        await host.take_lease(dom)  # before it runs here; LEASE_HELD leaves it paused
        if dom.state != DomainState.RUNNING:
            dom.pending_resume_reason = RunningReason.MIGRATED
            await dom.require_monitor().execute("cont")
            await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
        return
    if phase == MigrationPhase.FINISH3 and dom.state == DomainState.RUNNING:
        await host.take_lease(dom)  # it ran here already: this host took it in Finish
        if dom.reason == RunningReason.UNKNOWN:
            dom.set_state(DomainState.RUNNING, RunningReason.MIGRATED)
        # The guest runs on the copied disks: they stay; the NBD server goes.
        await storage.stop_nbd(host, dom)
        storage.forget(dom)
        dom.save()
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
