"""Post-copy: the switch-over, its failure, and what every resume step shares.

After ``migrate-start-postcopy`` the guest's CPU and device state move to the
destination, which runs the guest and pulls the pages it still lacks from the
source. From the destination's ``cont`` on nothing can be rolled back: the
newest state of the guest is split between the two hosts. So when the stream
or a daemon breaks, both sides keep their job in phase ``postcopy_failed``
(libvirt's asyncPaused), the source stays paused (``post-copy-failed``) and the
destination keeps running the guest (``post-copy-failed``; vCPUs that touch a
missing page wait). Resuming needs both QEMUs in ``postcopy-paused``: QEMU
goes there by itself when its socket fails, ``migrate-pause`` takes it there
when the socket merely went silent (a cut link: TCP does not notice for many
minutes). Then ``migrate-recover`` on the destination listens on a new port
and ``migrate`` with ``resume`` on the source reconnects.

The steps themselves live with their side (:mod:`vmferry.migration.source`,
:mod:`vmferry.migration.destination`); the watchers that complete or resume a
failed migration unattended live in :mod:`vmferry.migration.postcopy_watch`.
"""

from __future__ import annotations

import asyncio
import logging

from vmferry.domain.state import DomainState, PausedReason, RunningReason
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob, Job
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.phase import MigrationPhase
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import MigrationStatus

log = logging.getLogger(__name__)

#: QEMU migration states after the switch-over (the guest's newest state is split).
POSTCOPY_STATES = frozenset(
    {
        MigrationStatus.POSTCOPY_ACTIVE,
        MigrationStatus.POSTCOPY_PAUSED,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)
#: States in which the post-copy stream is alive (or being brought back).
ALIVE_STATES = frozenset(
    {
        MigrationStatus.POSTCOPY_ACTIVE,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)
_REASONS = frozenset({str(PausedReason.POSTCOPY), str(PausedReason.POSTCOPY_FAILED)})
#: How long QEMU gets to reach postcopy-paused after migrate-pause, or to react to a resume.
PAUSE_WAIT_S = 10.0
#: How long a resume step waits for an owner that is giving the job up (a Finish that waits).
RELEASE_WAIT_S = 15.0

API_START = "migrate-postcopy"


def in_postcopy(dom: QemuDomain) -> bool:
    """Whether *dom*'s migration job is past the switch-over (no rollback possible)."""
    job = dom.job
    if job.async_job not in (AsyncJob.MIGRATION_OUT, AsyncJob.MIGRATION_IN):
        return False
    if isinstance(job.phase, MigrationPhase) and job.phase.is_resume:
        return True
    return dom.migration.status in POSTCOPY_STATES or dom.reason in _REASONS


def failed(dom: QemuDomain) -> bool:
    """Whether *dom*'s post-copy migration is marked failed (phase ``postcopy_failed``)."""
    return in_postcopy(dom) and dom.job.phase == MigrationPhase.POSTCOPY_FAILED


def failed_error(dom: QemuDomain, why: str = "") -> VmferryError:
    """The error a step returns when post-copy broke under it."""
    job = "migration out" if dom.job.async_job == AsyncJob.MIGRATION_OUT else "migration in"
    text = f"job '{job}' failed in post-copy phase" + (f": {why}" if why else "")
    return VmferryError(
        ErrorCode.OPERATION_FAILED,
        f"{text}; domain '{dom.name}' runs on the destination and waits for the rest of its "
        "memory: resume with `vmferry migrate --postcopy --postcopy-resume`",
    )


# -- the switch ---------------------------------------------------------------------------------


async def switch(dom: QemuDomain) -> None:
    """``migrate-start-postcopy`` for the owner of the migration (Perform, the policy engine)."""
    await dom.require_monitor().execute("migrate-start-postcopy")
    log.info("domain %s: switching the migration to post-copy", dom.name)


async def start(dom: QemuDomain) -> None:
    """``vmferry migrate-postcopy``: switch the running outgoing migration to post-copy now.

    :raise VmferryError: ``OPERATION_INVALID`` without an outgoing migration
        in progress, without ``--postcopy``, or when already in post-copy.
    """
    async with dom.job.acquire(Job.MIGRATION_OP, API_START):
        if not dom.job.is_active(AsyncJob.MIGRATION_OUT) or dom.migration.status not in (
            MigrationStatus.SETUP,
            MigrationStatus.ACTIVE,
            *POSTCOPY_STATES,
        ):
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                "post-copy can only be started while outgoing migration is in progress",
            )
        if not MigrateFlags(dom.job.flags) & MigrateFlags.POSTCOPY:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                "switching to post-copy requires migration to be started with the --postcopy flag",
            )
        if dom.migration.status in POSTCOPY_STATES:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"migration of domain '{dom.name}' is already in post-copy mode",
            )
        # QEMU refuses the switch before the migration left "setup"; it is brief.
        await dom.wait_for(lambda: dom.migration.status != MigrationStatus.SETUP, 5.0)
        await switch(dom)


# -- breaking and marking --------------------------------------------------------------------------


async def pause(dom: QemuDomain) -> None:
    """``migrate-pause``: cut this side's post-copy stream so that it can be resumed.

    Returns once QEMU reports ``postcopy-paused`` (at once if it does already).
    """
    if dom.migration.status == MigrationStatus.POSTCOPY_PAUSED:
        return
    mon = dom.require_monitor()
    if dom.migration.status in ALIVE_STATES:
        log.warning("domain %s: pausing its post-copy migration", dom.name)
        await mon.execute("migrate-pause")
    if not await dom.wait_for(
        lambda: dom.migration.status == MigrationStatus.POSTCOPY_PAUSED or not mon.connected,
        PAUSE_WAIT_S,
    ):
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"post-copy migration of domain '{dom.name}' did not pause "
            f"(QEMU reports '{dom.migration.status}')",
        )


def mark_failed(dom: QemuDomain) -> None:
    """Phase ``postcopy_failed`` and the state reason that says so (libvirt's *PostcopyFailed).

    The source stays paused; the destination keeps running the guest. The
    reasons follow QEMU's own events too (:mod:`vmferry.qemu.lifecycle`); this
    also covers a failure QEMU has not seen (a daemon that went away).
    """
    if dom.job.phase != MigrationPhase.POSTCOPY_FAILED:
        log.warning("domain %s: post-copy migration failed; the job is kept", dom.name)
        dom.job.set_phase(MigrationPhase.POSTCOPY_FAILED)
    if dom.state == DomainState.PAUSED and dom.job.async_job == AsyncJob.MIGRATION_OUT:
        if dom.reason != PausedReason.POSTCOPY_FAILED:
            dom.set_state(DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
    elif dom.state == DomainState.RUNNING and dom.reason != RunningReason.POSTCOPY_FAILED:
        dom.set_state(DomainState.RUNNING, RunningReason.POSTCOPY_FAILED)


def keep_failed(dom: QemuDomain) -> None:
    """Mark failed and release the job (the owner gives up; the job stays for a resume)."""
    mark_failed(dom)
    if dom.job.owned:
        dom.job.continue_(cleanup=end_job(dom))


def end_job(dom: QemuDomain):  # type: ignore[no-untyped-def]
    """The cleanup of a kept post-copy job: its QEMU died, nothing is left to resume."""

    async def cleanup() -> None:
        log.error("domain %s: QEMU died during a post-copy migration", dom.name)
        dom.job.finish_async()

    return cleanup


# -- resume preconditions ----------------------------------------------------------------------


def check_resumable(dom: QemuDomain, async_job: AsyncJob) -> None:
    """libvirt's qemuMigrationAnyCanResume: a failed post-copy job nobody handles."""
    job = dom.job
    if not job.is_active(async_job):
        what = "being migrated" if async_job == AsyncJob.MIGRATION_OUT else "migrating here"
        raise VmferryError(ErrorCode.OPERATION_INVALID, f"domain '{dom.name}' is not {what}")
    if job.owned:
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"migration of domain '{dom.name}' is being actively handled by API '{job.async_api}'",
        )
    if not in_postcopy(dom):
        raise VmferryError(
            ErrorCode.OPERATION_INVALID, f"migration of domain '{dom.name}' is not in post-copy"
        )
    if job.phase != MigrationPhase.POSTCOPY_FAILED:
        if isinstance(job.phase, MigrationPhase) and job.phase.is_resume:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"resuming failed post-copy migration of domain '{dom.name}' is already "
                "in progress",
            )
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"post-copy migration of domain '{dom.name}' has not failed",
        )


async def take_over(dom: QemuDomain) -> None:
    """Make a step that waits on a silent post-copy stream (Finish) give the job up.

    A cut link leaves QEMU in ``postcopy-active`` with nothing arriving, and
    Finish waiting for it; pausing the stream makes that Finish fail and
    release the job, which a resume can then take.
    """
    job = dom.job
    waiting = (MigrationPhase.FINISH3, MigrationPhase.FINISH_RESUME)
    if not (job.owned and job.phase in waiting and in_postcopy(dom)):
        return
    async with job.acquire(Job.MODIFY_MIGRATION_SAFE, "migrate-prepare-resume"):
        await pause(dom)
    await wait_released(dom, RELEASE_WAIT_S)


async def wait_released(dom: QemuDomain, timeout: float) -> bool:
    """Wait until no API owns *dom*'s async job; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Ownership changes do not wake domain waiters: poll, the wait is short and rare.
    while dom.job.owned and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return not dom.job.owned
