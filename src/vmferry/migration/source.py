"""The source side: Begin, Perform (v3 and v2) and Confirm.

Failure rule of each step, as in libvirt:

* **Begin** fails: the job ends, the guest was never touched.
* **Perform3** fails: the migration is cancelled, the guest resumes here, the
  job ends (the client must not Confirm; it tells Finish "cancelled").
* **Perform3** succeeds: phase ``perform3_done``, guest paused here, job kept.
* **Confirm3** ``cancelled``: resume the guest here. Otherwise kill the source QEMU.
* **Perform2** (v2 has no Confirm): kill the source on success, resume on failure.

Post-copy (``--postcopy``): Perform is done once QEMU switched over
(``postcopy-active``; the guest stays paused here, reason ``post-copy``).
From then on nothing is rolled back: a cancelled Confirm marks the job
``postcopy_failed`` and keeps it (:mod:`vmferry.migration.postcopy`). The
resume steps (``begin_resume``, ``perform_resume``, ``confirm_resume``) put
the job back to ``postcopy_failed`` whenever they fail, so they can be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from vmferry.domain.state import (
    DomainState,
    EventType,
    PausedReason,
    RunningReason,
    ShutoffReason,
)
from vmferry.domain.xml import check_abi_stability, format_domain_xml, parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.failpoints import armed, failpoint
from vmferry.jobs import AsyncJob
from vmferry.migration import linkshare, postcopy, storage
from vmferry.migration import params as mparams
from vmferry.migration import policy as mpolicy
from vmferry.migration import tls as mtls
from vmferry.migration import tunnel as mtunnel
from vmferry.migration.cookie import MigrationCookie, parse_cookie, policy_report
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost, PerformLimits
from vmferry.migration.params import MigrationParams
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.stats import completed_stats, from_query_migrate, to_cookie
from vmferry.migration.uri import parse_migration_uri
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import TERMINAL, MigrationStatus
from vmferry.qemu.monitor import Monitor

log = logging.getLogger(__name__)

#: The unattended completion of a failed post-copy migration (libvirt's ProcessUnattended).
UNATTENDED_API = "migration-unattended"


#: How long ``migrate_cancel`` may take before the stream is yanked out of band: QEMU holds
#: its big lock while it writes the final device state, so a stalled peer blocks the monitor.
CANCEL_ANSWER_S = 3.0
#: Tries, and seconds between them, to take a lease back before the source resumes.
LEASE_RETRIES, LEASE_RETRY_S = 5, 0.5


def _cookie(host: MigrationHost, dom: QemuDomain, *, lease: str = "held") -> MigrationCookie:
    cookie = MigrationCookie(
        name=dom.name, uuid=dom.uuid, hostname=host.hostname, hostuuid=host.host_uuid
    )
    if host.lease_driver != "none":
        # libvirt's <lockstate>: who had the lease, and whether it is free to take now.
        cookie.lock_driver = host.lease_driver
        cookie.leases = f"{host.host_uuid}:{lease}"
    return cookie


# -- Begin ------------------------------------------------------------------------------------


async def begin(
    host: MigrationHost,
    dom: QemuDomain,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    api: str = "migrate-begin",
    session: str = "",
) -> tuple[str, str]:
    """Start the migration-out job; return (domain XML for the destination, cookie)."""
    params.validate(flags)
    if not params.bandwidth_mib_s:
        params.bandwidth_mib_s = dom.max_speed_mib_s
    offline = bool(flags & MigrateFlags.OFFLINE)
    if offline:
        if dom.persistent is None:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID, "offline migration needs a persistent domain"
            )
    else:
        dom.require_active()
    await dom.job.start_async(AsyncJob.MIGRATION_OUT, api, MigrationPhase.BEGIN3, flags=int(flags))
    try:
        xml = _destination_xml(dom, params, offline=offline)
        dom.migration.flags = int(flags)
        dom.migration.params = params.copy()
        dom.migration.was_running = dom.state == DomainState.RUNNING
        # No status write for these yet: nothing acts before continue_() below writes them
        # (a Begin3 job is recovered without them), the disks to copy with them.
        await failpoint("src-begin-before")
        if not offline:
            dom.require_active()  # QEMU may have died meanwhile: its status must not linger
        cookie = _cookie(host, dom)
        if not offline:
            cookie.capabilities = mparams.capabilities(flags, source=True)
            mtls.offer(host.tls, flags, cookie)
        dom.migration.storage_disks = []
        if storage.copies_storage(flags):
            cookie.nbd_disks = await storage.begin_disks(
                dom, params, top_only=bool(flags & MigrateFlags.NON_SHARED_INC)
            )
            cookie.mandatory.append("nbd")
            dom.migration.storage_disks = [d.target for d in cookie.nbd_disks]
        if session:
            host.bind_session(session, dom)  # fails if the client is already gone
    except BaseException:
        dom.job.finish_async()
        raise
    dom.job.continue_(cleanup=_job_cleanup(dom))
    await failpoint("src-begin-after")
    return xml, cookie.to_xml()


def _destination_xml(dom: QemuDomain, params: MigrationParams, *, offline: bool) -> str:
    source_def = dom.persistent if offline and dom.persistent is not None else dom.definition
    if not params.dest_xml:
        return format_domain_xml(source_def, migratable=True)
    dest_def = parse_domain_xml(params.dest_xml)
    check_abi_stability(source_def, dest_def)
    return format_domain_xml(dest_def, migratable=True)


def _job_cleanup(dom: QemuDomain):  # type: ignore[no-untyped-def]
    async def cleanup() -> None:
        # The source QEMU died between steps: nothing left to migrate.
        dom.job.finish_async()

    return cleanup


# -- Perform -----------------------------------------------------------------------------------


async def perform3(
    host: MigrationHost,
    dom: QemuDomain,
    cookie_in: str,
    uri: str,
    *,
    api: str = "migrate-perform",
    tunnel: mtunnel.Sender | None = None,
) -> str:
    """Send the guest to *uri* (or through *tunnel*); on success leave it paused for Confirm."""
    flags = MigrateFlags(dom.migration.flags)
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.PERFORM3, api)
    try:
        await failpoint("src-perform3-before")
        if flags & MigrateFlags.TUNNELLED and tunnel is None:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                "a tunnelled migration is run by the source daemon (peer-to-peer): "
                "there is no stream URI to perform to",
            )
        if not flags & MigrateFlags.OFFLINE:
            if tunnel is None:
                uri = await host.stream_uri(uri)
            answer = parse_cookie(
                cookie_in, name=dom.name, uuid=dom.uuid, local_hostuuid=host.host_uuid
            )
            use_tls = mtls.follow(host.tls, flags, answer)
            # the channels the destination's QEMU waits for (an encrypted stream)
            qemu_flags, qemu_params = mtls.shape(
                flags,
                dom.migration.params or MigrationParams(),
                mtls.answered_channels(host.tls, answer, use_tls),
            )
            await _run(
                dom,
                uri,
                qemu_flags,
                qemu_params,
                host.perform_limits,
                host.convergence,
                tls=host.tls if use_tls else None,
                tunnel=tunnel,
                nbd_port=answer.nbd_port,
            )
    except BaseException:
        await storage.cancel(dom)
        await restore_source(dom, flags, host)
        dom.job.finish_async()
        raise
    # The guest is stopped here for the switch-over: only now may the destination take its lease.
    if not flags & MigrateFlags.OFFLINE:
        host.release_lease(dom)
    cookie = _cookie(host, dom, lease="released")
    cookie.statistics = _sent_statistics(dom)
    cookie.policy = policy_report(dom.migration.stats)  # the actions, for Finish to show
    if flags & MigrateFlags.PERSIST_DEST and dom.persistent is not None:
        cookie.persistent_xml = format_domain_xml(dom.persistent, migratable=True)
        cookie.mandatory.append("persistent")
    # One status write for both: the guest is paused until Finish, every write counts.
    dom.job.continue_(cleanup=_job_cleanup(dom), phase=MigrationPhase.PERFORM3_DONE)
    await failpoint("src-perform3-after")
    return cookie.to_xml()


async def perform2(
    host: MigrationHost,
    dom: QemuDomain,
    uri: str,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    api: str = "migrate-perform2",
) -> None:
    """Protocol v2: migrate, then kill the source on success or resume it on failure."""
    params.validate(flags)
    if flags & MigrateFlags.TUNNELLED:
        raise VmferryError(
            ErrorCode.OPERATION_INVALID, "a tunnelled migration requires migration protocol v3"
        )
    uri = await host.stream_uri(uri)  # refused before the job starts: nothing changes
    use_tls = mtls.follow(host.tls, flags, None)  # v2: --tls alone decides
    if storage.copies_storage(flags):
        # v2 has no cookie to carry the NBD server's port (QEMU's old block migration is gone).
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            "storage migration (--copy-storage-all/-inc) requires migration protocol v3",
        )
    if not params.bandwidth_mib_s:
        params.bandwidth_mib_s = dom.max_speed_mib_s
    dom.require_active()
    if flags & MigrateFlags.POSTCOPY:
        # v2 has no Finish before the source is killed: nothing would resume the guest there.
        raise VmferryError(
            ErrorCode.OPERATION_INVALID, "post-copy migration requires migration protocol v3"
        )
    await dom.job.start_async(
        AsyncJob.MIGRATION_OUT, api, MigrationPhase.PERFORM2, flags=int(flags)
    )
    dom.migration.flags = int(flags)
    dom.migration.params = params.copy()
    dom.migration.was_running = dom.state == DomainState.RUNNING
    dom.save()  # recovery needs was_running
    try:
        await failpoint("src-perform2-before")
        await _run(
            dom,
            uri,
            flags,
            params,
            host.perform_limits,
            host.convergence,
            tls=host.tls if use_tls else None,
        )
    except BaseException:
        await restore_source(dom, flags, host)
        dom.job.finish_async()
        raise
    host.release_lease(dom)  # stopped here: the destination takes it in Finish
    try:
        await complete_outgoing(host, dom, flags)
    finally:
        dom.job.finish_async()
    await failpoint("src-perform2-after")


async def _run(
    dom: QemuDomain,
    uri: str,
    flags: MigrateFlags,
    params: MigrationParams,
    limits: PerformLimits | None = None,
    convergence: mpolicy.ConvergenceDefaults | None = None,
    *,
    tls: mtls.TlsSetup | None = None,
    tunnel: mtunnel.Sender | None = None,
    nbd_port: int | None = None,
) -> None:
    """libvirt's qemuMigrationSrcRun: apply parameters, mirror the disks, migrate, wait.

    :param convergence: the daemon's default contract, for a live migration that does not
        name all of its own (None: only the request's).
    :param tls: encrypt the stream with these credentials (QEMU's TLS).
    :param tunnel: send the stream through the daemons' connection, not to *uri*.
    """
    mon = dom.require_monitor()
    dom.migration.status = MigrationStatus.SETUP
    dom.migration.iteration = 0
    dom.migration.started = time.time()
    dom.migration.stopped = 0.0
    try:
        await _send(dom, uri, flags, params, mon, limits, convergence, tls, tunnel, nbd_port)
    finally:
        await linkshare.release(dom)


async def _send(
    dom: QemuDomain,
    uri: str,
    flags: MigrateFlags,
    params: MigrationParams,
    mon: Monitor,
    limits: PerformLimits | None,
    convergence: mpolicy.ConvergenceDefaults | None,
    tls: mtls.TlsSetup | None,
    tunnel: mtunnel.Sender | None,
    nbd_port: int | None,
) -> None:
    extra: dict[str, Any] = {}
    if tls is not None:
        # the destination's certificate must name the host the stream goes to
        extra = await mtls.enable(tls, dom, server=False, hostname=_uri_host(uri))

    async def set_up() -> None:
        await mparams.apply(mon, params, flags, source=True, extra=extra)
        # The convergence policy's own settings; it may switch the migration to post-copy.
        await mpolicy.prepare(
            dom, mon, params, flags, postcopy_switch=postcopy.switch, defaults=convergence
        )

    if dom.migration.storage_disks:
        # Every disk in sync before the memory moves; the mirrors stay in sync meanwhile.
        # The migration's parameters are set while the disks copy, off the critical path.
        await failpoint("src-perform-mirror")
        try:
            await storage.mirror_all(
                dom,
                "" if tunnel is not None else parse_migration_uri(uri).host,
                nbd_port,
                tls_creds=mtls.MIGRATION_CREDS if tls is not None else "",
                stall_s=(limits or PerformLimits()).stall_s,
                tunnel=tunnel,
                meanwhile=set_up,
            )
        except BaseException:
            await storage.cancel(dom)
            raise
        await failpoint("src-perform-mirror-ready")
    else:
        await set_up()
    if not flags & MigrateFlags.LIVE and dom.state == DomainState.RUNNING:
        dom.pending_pause_reason = "migration"
        await mon.execute("stop")
    # On a link the drain shares, wait for this migration's turn to send, all set up: the
    # parameters applied, the destination listening (the policy's clock starts now).
    if await linkshare.admit(dom, params, mon):
        mpolicy.restart_clock(dom)
    if dom.job.abort_requested:
        await storage.cancel(dom)
        raise _aborted()
    relay: asyncio.Task[None] | None = None
    if tunnel is not None:
        end = await mtunnel.give_qemu_end(mon)
        relay = asyncio.create_task(mtunnel.relay_out(end, tunnel))
        uri = f"fd:{mtunnel.FD_NAME}"
    try:
        await mon.execute("migrate", {"uri": uri})
    except BaseException:
        await _stop_relay(relay)
        raise
    try:
        if armed("src-perform-migrating"):
            await dom.wait_for(lambda: dom.migration.status != MigrationStatus.SETUP, 10.0)
            await failpoint("src-perform-migrating")
        await _wait_completion(
            dom,
            params.timeout_suspend_s,
            after_precopy=params.postcopy_after_precopy,
            limits=limits or PerformLimits(),
        )
        if relay is not None:
            # QEMU wrote it all; the destination must have taken it all too
            stall = (limits or PerformLimits()).stall_s
            await asyncio.wait_for(asyncio.shield(relay), stall)
    except BaseException as err:
        if dom.monitor is not None and dom.monitor.connected:
            await _cancel(dom)
        await storage.cancel(dom)
        failed = await _stop_relay(relay)
        if failed is not None and isinstance(err, VmferryError):
            raise failed from err  # why the stream broke, rather than QEMU's broken pipe
        raise


async def _stop_relay(relay: asyncio.Task[None] | None) -> VmferryError | None:
    """End the tunnel's relay; the error it failed with, if any."""
    if relay is None:
        return None
    if not relay.done():
        relay.cancel()
    try:
        await relay
    except VmferryError as err:
        return err
    except (asyncio.CancelledError, Exception) as exc:
        log.debug("tunnel relay ended: %r", exc)
    return None


def _uri_host(uri: str) -> str:
    """The host of a checked ``tcp:HOST:PORT`` (brackets of IPv6 removed)."""
    host = uri.removeprefix("tcp:").rpartition(":")[0]
    return host.strip("[]")


async def _wait_completion(
    dom: QemuDomain,
    timeout_suspend_s: float,
    *,
    after_precopy: bool = False,
    limits: PerformLimits | None = None,
) -> None:
    # The convergence policy, if any, acts at each wake-up; its report joins the statistics.
    engine = mpolicy.engine_for(dom)
    try:
        await _wait_loop(
            dom,
            timeout_suspend_s,
            engine,
            after_precopy=after_precopy,
            watchdog=_Watchdog(dom, limits or PerformLimits()),
        )
    except BaseException:
        await mpolicy.finish(dom, None)
        raise
    await mpolicy.finish(dom, dom.migration.stats)


async def _wait_loop(
    dom: QemuDomain,
    timeout_suspend_s: float,
    engine: mpolicy.Engine | None,
    *,
    after_precopy: bool = False,
    watchdog: _Watchdog | None = None,
) -> None:
    suspend_at = time.monotonic() + timeout_suspend_s if timeout_suspend_s > 0 else None
    switch_pending = after_precopy

    def precopy_done() -> bool:
        # MIGRATION_PASS 2 starts once the first full pass is over.
        return switch_pending and dom.migration.iteration >= 2

    def settled() -> bool:
        return (
            dom.migration.status in TERMINAL
            or dom.migration.status == MigrationStatus.PRE_SWITCHOVER
            or dom.migration.status in postcopy.POSTCOPY_STATES
            or precopy_done()
            or dom.job.abort_requested
            or dom.monitor is None
            or not dom.monitor.connected
            or (engine is not None and engine.due())
        )

    while True:
        left = None if suspend_at is None else max(0.0, suspend_at - time.monotonic())
        if engine is not None:
            left = engine.wait_s(left)
        if watchdog is not None:
            left = watchdog.wait_s(left)
        await dom.wait_for(settled, left)
        if dom.monitor is None or not dom.monitor.connected:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"domain '{dom.name}' unexpectedly shut down during migration",
            )
        if dom.job.abort_requested:
            raise _aborted()
        status = dom.migration.status
        if status == MigrationStatus.COMPLETED or status in postcopy.POSTCOPY_STATES:
            # Switched to post-copy: the guest runs there from Finish on; Perform is done.
            info = await dom.monitor.execute("query-migrate")
            dom.migration.stats = storage.with_disk(
                from_query_migrate(info, started=dom.migration.started),
                storage.final_progress(dom),
            )
            return
        if status == MigrationStatus.PRE_SWITCHOVER:
            # vCPUs stopped, memory sent: the disks' last writes go, then the device state.
            await failpoint("src-perform-switchover")
            await storage.complete(dom)
            dom.migration.status = MigrationStatus.DEVICE  # until QEMU's next event says more
            await dom.require_monitor().execute("migrate-continue", {"state": "pre-switchover"})
            # The concluded mirrors stay: Confirm kills this QEMU with them, and a source
            # that runs on drops them first (restore_source). Dismissing them here would
            # wait for QEMU to finish the device state and delay Finish.
            continue
        if precopy_done() and status == MigrationStatus.ACTIVE:
            switch_pending = False
            await postcopy.switch(dom)
            continue
        if status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            info = await dom.monitor.execute("query-migrate")
            desc = info.get("error-desc", "") if isinstance(info, dict) else ""
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"migration of domain '{dom.name}' {status}" + (f": {desc}" if desc else ""),
            )
        if watchdog is not None:
            await watchdog.check()
        if suspend_at is not None and time.monotonic() >= suspend_at:
            suspend_at = None
            if dom.state == DomainState.RUNNING:
                log.info("suspending %s so that its migration completes", dom.name)
                dom.pending_pause_reason = "migration"
                await dom.monitor.execute("stop")
        if engine is not None:
            await engine.step()


class _Watchdog:
    """Fails a Perform whose stream stopped moving, or that ran past its overall limit."""

    def __init__(self, dom: QemuDomain, limits: PerformLimits) -> None:
        self._dom = dom
        self._limits = limits
        now = time.monotonic()
        self._deadline = now + limits.total_s if limits.total_s > 0 else None
        self._last_move = now
        self._seen: tuple[Any, ...] = ()
        # Several looks per stall period, so a stall is noticed within ~1/3 of it late.
        self._every = max(0.2, min(5.0, limits.stall_s / 3))
        self._next = now + self._every

    def wait_s(self, left: float | None) -> float:
        until = max(0.0, self._next - time.monotonic())
        return until if left is None else min(left, until)

    async def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._every
        dom = self._dom
        if self._deadline is not None and now >= self._deadline:
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"migration of domain '{dom.name}' did not complete within "
                f"{self._limits.total_s:g} s ([migration] perform_timeout): cancelled",
            )
        mon = dom.monitor
        seen: tuple[Any, ...] = (dom.migration.status, dom.migration.iteration)
        if mon is not None and mon.connected:
            try:
                info = await mon.execute("query-migrate", timeout=self._every)
            except VmferryError:
                info = None  # no answer: QEMU is stuck writing to the peer
            if isinstance(info, dict):
                ram = info.get("ram") or {}
                seen = (info.get("status"), ram.get("transferred"), ram.get("dirty-sync-count"))
        if seen != self._seen:
            self._seen, self._last_move = seen, now
        elif now - self._last_move >= self._limits.stall_s:
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"migration of domain '{dom.name}' made no progress for "
                f"{self._limits.stall_s:g} s ([migration] perform_stall_timeout): "
                "the destination stopped receiving; cancelled",
            )


def _aborted() -> VmferryError:
    return VmferryError(ErrorCode.OPERATION_ABORTED, "job 'migration out' canceled by client")


async def _cancel(dom: QemuDomain) -> None:
    """migrate_cancel and wait until QEMU says the migration is over."""
    mon = dom.monitor
    if mon is None or dom.migration.status in (
        MigrationStatus.FAILED,
        MigrationStatus.CANCELLED,
        MigrationStatus.NONE,
    ):
        return
    await cancel_stream(dom)
    await dom.wait_for(lambda: dom.migration.status in TERMINAL or not mon.connected, 10.0)


async def cancel_stream(dom: QemuDomain) -> None:
    """``migrate_cancel``; if QEMU does not answer (stuck writing to the peer), yank the stream.

    ``yank`` runs out of band, so it gets through while the migration holds QEMU's lock.
    """
    mon = dom.monitor
    if mon is None or not mon.connected:
        return
    try:
        await mon.execute("migrate_cancel", timeout=CANCEL_ANSWER_S)
        return
    except VmferryError as err:
        if err.code != ErrorCode.OPERATION_TIMEOUT:
            log.warning("cancelling migration of %s: %s", dom.name, err.message)
            return
    log.warning("QEMU of %s does not answer migrate_cancel: yanking the stream", dom.name)
    try:
        await mon.execute("yank", {"instances": [{"type": "migration"}]})
    except VmferryError as err:
        log.warning("yanking the migration stream of %s: %s", dom.name, err.message)


async def restore_source(
    dom: QemuDomain, flags: MigrateFlags, host: MigrationHost | None = None
) -> None:
    """Put the source back as it was: parameters reset, guest running if it was.

    The guest resumes only once its lease is back here (*host* takes it again):
    when another host took it meanwhile, the guest stays paused (``lease-lost``).
    """
    mon = dom.monitor
    if mon is None or not mon.connected:
        return
    # Mirrors concluded at a switchover, or left by a failure: gone before the guest runs.
    await storage.cancel(dom)
    try:
        await mpolicy.restore(dom)  # the policy's settings, kept after a completed wait
        await mparams.reset(mon, flags, source=True)
    except VmferryError as err:
        # Not a reason to leave the guest paused: the next migration sets them again.
        log.warning("resetting migration parameters of %s: %s", dom.name, err.message)
    await mtls.disable(dom)
    try:
        if dom.migration.was_running and dom.state != DomainState.RUNNING:
            if host is not None and not await retake_lease(host, dom):
                return
            dom.pending_resume_reason = RunningReason.MIGRATION_CANCELED
            await mon.execute("cont")
            await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
    except VmferryError as err:
        log.error("could not restore domain %s after a failed migration: %s", dom.name, err)


async def retake_lease(host: MigrationHost, dom: QemuDomain) -> bool:
    """Take *dom*'s lease back before it resumes here; False (guest left paused) if taken."""
    for attempt in range(LEASE_RETRIES):
        if attempt:
            # A destination that gave up may still be releasing it (etcd: in the background).
            await asyncio.sleep(LEASE_RETRY_S)
        try:
            await host.take_lease(dom)
            return True
        except VmferryError as err:
            if err.code != ErrorCode.LEASE_HELD:
                raise
            held = err
    log.error("domain %s stays paused: %s", dom.name, held.message)
    if dom.state == DomainState.PAUSED:
        dom.set_state(DomainState.PAUSED, PausedReason.LEASE_LOST)
    return False


def _sent_statistics(dom: QemuDomain) -> dict[str, int]:
    # QEMU's figures travel too, so the destination can answer domjobinfo --completed.
    # libvirt's cookie: times in ms since the epoch (0: not set).
    stats = to_cookie(dom.migration.stats)
    stats.update(
        started=int(dom.migration.started * 1000),
        stopped=int(dom.migration.stopped * 1000),
        sent=int(time.time() * 1000),
    )
    return stats


# -- Confirm ------------------------------------------------------------------------------------


async def confirm3(
    host: MigrationHost,
    dom: QemuDomain,
    cookie_in: str,
    *,
    cancelled: bool,
    api: str = "migrate-confirm",
) -> None:
    """Kill the source after a successful Finish, or resume it when the migration was cancelled."""
    arrived = time.time()  # before anything else: the guest-visible downtime ends before it
    phase = MigrationPhase.CONFIRM3_CANCELLED if cancelled else MigrationPhase.CONFIRM3
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, phase, api)
    host.unbind_session(dom)
    flags = MigrateFlags(dom.migration.flags)
    if cancelled and postcopy.in_postcopy(dom):
        # The destination may run the guest already: never resume it here.
        postcopy.keep_failed(dom)
        await failpoint("src-confirm3-after")
        return
    try:
        await failpoint("src-confirm3-before")
        if cookie_in and not cancelled:
            cookie = parse_cookie(
                cookie_in, name=dom.name, uuid=dom.uuid, local_hostuuid=host.host_uuid
            )
            dom.completed_job = completed_stats(dom, cookie.statistics, arrived=arrived)
        if cancelled:
            await restore_source(dom, flags, host)
        else:
            await _settle_stream(dom)
            await complete_outgoing(host, dom, flags)
    finally:
        dom.job.finish_async()
    await failpoint("src-confirm3-after")


async def _settle_stream(dom: QemuDomain) -> None:
    # After post-copy the destination completes a moment before this side says so.
    if dom.migration.status not in postcopy.POSTCOPY_STATES:
        return
    await dom.wait_for(
        lambda: dom.migration.status not in postcopy.POSTCOPY_STATES or not dom.active,
        postcopy.PAUSE_WAIT_S,
    )
    mon = dom.monitor
    if dom.migration.status == MigrationStatus.COMPLETED and mon is not None and mon.connected:
        with contextlib.suppress(VmferryError):
            info = await mon.execute("query-migrate")
            dom.migration.stats = from_query_migrate(info, started=dom.migration.started)


async def complete_outgoing(host: MigrationHost, dom: QemuDomain, flags: MigrateFlags) -> None:
    """The guest runs on the destination now: stop it here and drop what must go."""
    if dom.completed_job is None:
        dom.completed_job = completed_stats(dom, {})
    mpolicy.forget(dom)
    if dom.active:
        await host.lifecycle.stop(dom, ShutoffReason.MIGRATED)
    if flags & MigrateFlags.UNDEFINE_SOURCE and dom.persistent is not None:
        host.unpersist_definition(dom)
        host.lifecycle.emit(dom, EventType.UNDEFINED, "removed", {})
    if dom.persistent is None and not dom.active:
        host.remove(dom)


# -- post-copy resume -----------------------------------------------------------------------------


async def begin_resume(
    host: MigrationHost,
    dom: QemuDomain,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    api: str = "migrate-begin",
    session: str = "",
) -> tuple[str, str]:
    """Begin resuming a failed post-copy migration: QEMU paused, (domain XML, cookie) out."""
    params.validate(flags)
    postcopy.check_resumable(dom, AsyncJob.MIGRATION_OUT)
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.BEGIN_RESUME, api)
    try:
        await postcopy.pause(dom)
        if params.postcopy_bandwidth_mib_s:
            dom.migration.params = (dom.migration.params or MigrationParams()).copy(
                postcopy_bandwidth_mib_s=params.postcopy_bandwidth_mib_s
            )
        xml = format_domain_xml(dom.definition, migratable=True)
        cookie = _cookie(host, dom)
        if session:
            host.bind_session(session, dom)
    except BaseException:
        postcopy.keep_failed(dom)
        raise
    dom.job.continue_(cleanup=postcopy.end_job(dom))
    return xml, cookie.to_xml()


async def perform_resume(
    host: MigrationHost, dom: QemuDomain, cookie_in: str, uri: str, *, api: str = "migrate-perform"
) -> str:
    """Reconnect the post-copy stream to the destination's ``migrate-recover`` at *uri*."""
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.PERFORM_RESUME, api)
    try:
        uri = await host.stream_uri(uri)
        parse_cookie(cookie_in, name=dom.name, uuid=dom.uuid, local_hostuuid=host.host_uuid)
        mon = dom.require_monitor()
        values = mparams.resume_parameters(dom.migration.params or MigrationParams())
        if values:
            await mon.execute("migrate-set-parameters", values)
        # Every event of this resume comes after the command: a postcopy-paused seen from
        # here on means the reconnection failed.
        dom.migration.status = MigrationStatus.POSTCOPY_RECOVER_SETUP
        try:
            await mon.execute("migrate", {"uri": uri, "resume": True})
        except VmferryError:
            dom.migration.status = MigrationStatus.POSTCOPY_PAUSED
            raise
        await dom.wait_for(
            lambda: (
                dom.migration.status
                not in (MigrationStatus.POSTCOPY_RECOVER_SETUP, MigrationStatus.POSTCOPY_RECOVER)
                or not mon.connected
            ),
            postcopy.PAUSE_WAIT_S,
        )
        if dom.migration.status not in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.COMPLETED):
            raise postcopy.failed_error(
                dom, f"resuming did not reconnect (QEMU reports '{dom.migration.status}')"
            )
    except BaseException:
        if dom.active:
            postcopy.keep_failed(dom)
        raise
    dom.job.continue_(cleanup=postcopy.end_job(dom))
    return _cookie(host, dom).to_xml()


async def confirm_resume(
    host: MigrationHost,
    dom: QemuDomain,
    cookie_in: str,
    *,
    cancelled: bool,
    api: str = "migrate-confirm",
) -> None:
    """The resumed migration completed there: kill the source; else back to postcopy_failed."""
    arrived = time.time()
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.CONFIRM_RESUME, api)
    host.unbind_session(dom)
    if cancelled:
        postcopy.keep_failed(dom)
        return
    if cookie_in:
        with_stats = parse_cookie(
            cookie_in, name=dom.name, uuid=dom.uuid, local_hostuuid=host.host_uuid
        )
        dom.completed_job = completed_stats(dom, with_stats.statistics, arrived=arrived)
    try:
        await _settle_stream(dom)
        await complete_outgoing(host, dom, MigrateFlags(dom.migration.flags))
    finally:
        dom.job.finish_async()


async def complete_unattended(host: MigrationHost, dom: QemuDomain) -> None:
    """QEMU completed a failed post-copy migration nobody was resuming: finish it here."""
    log.info("domain %s: post-copy migration completed unattended: stopping it here", dom.name)
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, MigrationPhase.CONFIRM_RESUME, UNATTENDED_API)
    try:
        await complete_outgoing(host, dom, MigrateFlags(dom.migration.flags))
    finally:
        dom.job.finish_async()
