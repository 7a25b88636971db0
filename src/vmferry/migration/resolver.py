"""Settling an outgoing migration whose outcome is unknown (``perform3_done``).

Where libvirt leaves the source paused (``perform3_done``: Finish's answer
never came back), vmferry asks the peer daemon
(:func:`vmferry.migration.peer_probe.ask`) whether the guest arrived: running
there with no incoming job means the migration succeeded (kill the source as
Confirm would); no such domain, or shut off there, means it never took over
(resume here); still in its incoming job means ask again later. While the
peer cannot be reached the guest stays paused with reason
``migration-unresolved`` and the question is repeated, at most
:data:`RETRY_INTERVAL_S` seconds apart. The same resolver settles a
client-managed migration whose client went away after Perform, a
peer-to-peer one whose Finish answer was lost, and one a restart interrupted
(:mod:`vmferry.migration.restart`).
"""

from __future__ import annotations

import asyncio
import logging

from vmferry.domain.state import DomainState, PausedReason
from vmferry.errors import VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration import params as mparams
from vmferry.migration import peer_probe
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost
from vmferry.migration.peer_probe import MigrationPeer, PeerAnswer
from vmferry.migration.phase import MigrationPhase

# The source's own Confirm actions, reused so the resolver does exactly what Confirm would.
from vmferry.migration.source import complete_outgoing, restore_source
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)

#: Owner API of the job while the resolver handles it.
RESOLVE_API = "migration-resolve"

#: How often an unresolved outgoing migration asks the destination again: first
#: after FIRST_RETRY_S, doubling up to RETRY_INTERVAL_S.
FIRST_RETRY_S = 0.25
RETRY_INTERVAL_S = 2.0


def settle(host: MigrationHost, dom: QemuDomain) -> None:
    """Settle *dom*'s outgoing migration in ``perform3_done`` (job not owned) via its peer.

    Without a peer to ask, the job ends (``confirm3_cancelled``) and the guest
    stays paused with reason ``migration-unresolved``.
    """
    if not start(host, dom):
        dom.job.set_phase(MigrationPhase.CONFIRM3_CANCELLED)
        dom.job.finish_async()


def start(host: MigrationHost, dom: QemuDomain) -> bool:
    """Settle an outgoing migration left in ``perform3_done`` whose job the caller owns.

    With a known peer (``host.migration_peers``), hands the job to
    :func:`resolve_outgoing` (run by ``host.spawn``) and returns True. Without
    one nobody can tell where the guest should run: it stays paused with
    reason ``migration-unresolved``, the job is left for the caller to end
    (libvirt's behaviour), and False is returned.
    """
    peer = host.migration_peers.get(dom.uuid)
    if peer is None:
        log.warning(
            "domain %s: outcome of the migration unknown and no destination to ask: "
            "guest stays paused (resume or destroy it once you know where it runs)",
            dom.name,
        )
        mark_unresolved(dom)
        return False
    if dom.job.owned:
        dom.job.continue_()  # hand over: the resolver becomes the owner
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.PERFORM3_DONE, RESOLVE_API)
    host.spawn(resolve_outgoing(host, dom, peer))
    return True


def mark_unresolved(dom: QemuDomain) -> None:
    """Paused with reason ``migration-unresolved``: nobody knows yet where it runs."""
    if dom.state == DomainState.PAUSED and dom.reason != PausedReason.MIGRATION_UNRESOLVED:
        dom.set_state(DomainState.PAUSED, PausedReason.MIGRATION_UNRESOLVED)


async def resolve_outgoing(
    host: MigrationHost,
    dom: QemuDomain,
    peer: MigrationPeer,
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
            answer = await peer_probe.ask(host, dom, peer)
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
                await resume_source(dom, flags, host)
                break
            if answer is PeerAnswer.UNREACHABLE:
                mark_unresolved(dom)
            await dom.wait_for(interrupted, delay)
            delay = min(delay * 2, interval)
        if dom.job.abort_requested and dom.active:
            log.warning(
                "domain %s: resolving abandoned by domjobabort; guest stays paused", dom.name
            )
            mark_unresolved(dom)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("domain %s: resolving the interrupted migration failed", dom.name)
    if dom.job.async_job is AsyncJob.MIGRATION_OUT:
        dom.job.finish_async()


async def resume_source(
    dom: QemuDomain, flags: MigrateFlags, host: MigrationHost | None = None
) -> None:
    """Back to how the guest was before the migration: parameters reset, running if it was."""
    if dom.state == DomainState.PAUSED and dom.reason not in (
        PausedReason.MIGRATION,
        PausedReason.UNKNOWN,
        PausedReason.MIGRATION_UNRESOLVED,
    ):
        # Paused for another reason (by the user meanwhile): not the migration's to undo.
        await _reset_params(dom, flags)
        return
    await restore_source(dom, flags, host)
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
