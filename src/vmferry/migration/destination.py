"""The destination side: Prepare and Finish (both protocols).

Failure rule of each step, as in libvirt:

* **Prepare** fails: the incoming QEMU is killed, its port released, a domain
  object made for it removed, the job ended.
* **Finish** ``cancelled`` or failing: the incoming QEMU is killed (the source
  resumes in Confirm). v3 Finish fails hard; v2 Finish is lenient once the
  stream arrived, because the v2 source is already gone.
* **Finish** succeeds: the guest resumes here (or stays paused with --suspend)
  and the job ends.

Post-copy: Finish resumes the guest as soon as the stream switched over
(``running``/``post-copy``) and then waits for QEMU to complete it
(``running``/``migrated``). From that ``cont`` on the guest is never
discarded: a failure marks the job ``postcopy_failed`` and keeps it; so does a
cancelled Finish or a lost client once QEMU switched over, because then only
this side can ever run the guest again. ``prepare_resume`` (``migrate-recover``
on a new port) and ``finish_resume`` resume it; a failed try returns to
``postcopy_failed``.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import replace
from typing import Any

from vmferry.domain.model import DomainDef
from vmferry.domain.state import (
    DomainState,
    EventType,
    PausedReason,
    RunningReason,
    ShutoffReason,
)
from vmferry.domain.xml import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.failpoints import failpoint
from vmferry.jobs import AsyncJob
from vmferry.migration import params as mparams
from vmferry.migration import postcopy, storage
from vmferry.migration import tls as mtls
from vmferry.migration import tunnel as mtunnel
from vmferry.migration.cookie import MigrationCookie, check_lockstate, parse_cookie
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost
from vmferry.migration.params import MigrationParams
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.stats import from_cookie
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import TERMINAL, MigrationStatus
from vmferry.qemu.monitor import QmpCommand

log = logging.getLogger(__name__)

#: The job starter recorded by a v2 Prepare (v2 has no Confirm: see destroy_incoming).
PREPARE2_API = "migrate-prepare2"
# How long Finish waits for the incoming stream to complete after the source said it sent it all.
FINISH_WAIT_S = 60.0
#: How long Finish waits for an incoming stream that has not even started.
STREAM_START_WAIT_S = 5.0
#: The unattended completion of a failed post-copy migration (libvirt's ProcessUnattended).
UNATTENDED_API = "migration-unattended"


async def prepare(
    host: MigrationHost,
    xml: str,
    cookie_in: str | None,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    session: str = "",
    api: str = "migrate-prepare",
) -> tuple[str, str]:
    """Get ready for an incoming guest; return (URI the source must send to, cookie)."""
    params.validate(flags)
    if cookie_in is None and api == "migrate-prepare":
        # v2 (no cookie); persisted as the job's starter, recovery treats v2 differently
        api = PREPARE2_API
    definition = parse_domain_xml(xml)
    original_name = definition.name
    if params.dname:
        definition = replace(definition, name=params.dname)
    copy = storage.copies_storage(flags)
    # The XML comes from another host: this host's rules decide what its QEMU may reach
    # (disks still to be created are checked once they exist, below).
    if not copy:
        host.check_definition(definition)
    offer = None
    if cookie_in is not None:
        offer = parse_cookie(
            cookie_in, name=original_name, uuid=definition.uuid, local_hostuuid=host.host_uuid
        )
        if not flags & MigrateFlags.OFFLINE:
            await _check_lease(host, offer, original_name)
    nbd_disks = offer.nbd_disks if offer is not None else []
    if copy and (cookie_in is None or not nbd_disks):
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            "storage migration (--copy-storage-all/-inc) requires migration protocol v3 "
            "and a source that names the disks to copy",
        )
    # decided before anything is made: a refused migration leaves nothing behind
    use_tls = not flags & MigrateFlags.OFFLINE and mtls.decide(host.tls, flags, offer)
    # v2 (no offer) cannot answer a channel count: its stream stays as the client asked
    channels = mtls.channels(host.tls, flags, use_tls, offer.tls_channels) if offer else 0
    qemu_flags, qemu_params = mtls.shape(flags, params, channels)
    existing = host.check_clash(definition, allow_inactive_same=True)
    if existing is not None and existing.active:
        raise VmferryError(
            ErrorCode.DOMAIN_EXISTS, f"domain '{existing.name}' is already active on this host"
        )
    new_disks = storage.plan_disks(host, definition, nbd_disks) if copy else []
    dom = existing if existing is not None else host.add(definition, None)

    recorded: list[bool] = []

    def record() -> None:
        # In the job's first status write: recovery needs created_here, and every disk
        # this migration creates is recorded before it is made.
        recorded.append(True)
        dom.migration.created_here = existing is None
        dom.migration.origin_name = original_name  # Finish checks the cookie against it
        dom.migration.flags = int(flags)
        dom.migration.params = params.copy()
        dom.definition = definition
        dom.migration.storage_disks = [d.target for d in nbd_disks] if copy else []
        dom.migration.created_volumes = [d.path for d in new_disks]

    try:
        await dom.job.start_async(
            AsyncJob.MIGRATION_IN, api, MigrationPhase.PREPARE, flags=int(flags), setup=record
        )
    except BaseException:
        if recorded:  # its write failed: no job, nothing made
            storage.forget(dom)
            if existing is not None and existing.persistent is not None:
                dom.definition = existing.persistent
        raise
    uri = ""
    nbd_port = None
    try:
        await failpoint("dst-prepare-before")
        if copy:
            await storage.create_disks(host, dom, new_disks)
            host.check_definition(definition)
            await failpoint("dst-prepare-storage")
        if not flags & MigrateFlags.OFFLINE:
            uri = await _start_incoming(
                host, dom, qemu_flags, qemu_params, use_tls=use_tls, serve_disks=copy
            )
        if copy and not flags & MigrateFlags.TUNNELLED:
            nbd_port = dom.migration.nbd_port
        if session:
            # The client may have left while Prepare ran: then nobody would Finish it.
            host.bind_session(session, dom)
    except BaseException:
        await discard_incoming(host, dom)
        raise
    dom.job.continue_(cleanup=_prepare_cleanup(host, dom))
    await failpoint("dst-prepare-after")
    cookie = MigrationCookie(
        name=original_name, uuid=dom.uuid, hostname=host.hostname, hostuuid=host.host_uuid
    )
    if not flags & MigrateFlags.OFFLINE:
        cookie.capabilities = mparams.capabilities(qemu_flags, source=False)
        if offer is not None:
            cookie.tls_use = use_tls
            cookie.tls_channels = channels or None
    if nbd_port is not None:
        cookie.nbd_port = nbd_port
    return uri, cookie.to_xml()


async def _check_lease(host: MigrationHost, cookie: MigrationCookie, name: str) -> None:
    """Refuse a guest whose lease a third host holds: it runs there, not on the source."""
    check_lockstate(cookie, host.lease_driver)
    holder = await host.lease_holder(cookie.uuid)
    if holder and holder not in (cookie.hostuuid, host.host_uuid):
        raise VmferryError(
            ErrorCode.LEASE_HELD,
            f"domain '{name}' is running on host {holder}, not on the source "
            f"{cookie.hostname}: its lease is held there",
        )


async def _start_incoming(
    host: MigrationHost,
    dom: QemuDomain,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    use_tls: bool = False,
    serve_disks: bool = False,
) -> str:
    """Start the incoming QEMU listening for the stream (and, *serve_disks*, serving the
    copied disks over NBD); return the URI the source must send to ("" tunnelled).

    Everything after QEMU's start goes in one pipelined batch of QMP commands where
    nothing needs an answer first (TLS's objects and a tunnel's descriptor do).
    """
    if flags & MigrateFlags.TUNNELLED:
        # no port: the stream comes through the daemons' connection (vmferry.migration.tunnel)
        await host.lifecycle.start(
            dom, incoming=True, setup=mparams.commands(params, flags, source=False)
        )
        mon = dom.require_monitor()
        dom.migration.tunnel = await mtunnel.give_qemu_end(mon)
        await mon.execute("migrate-incoming", {"uri": f"fd:{mtunnel.FD_NAME}"})
        if serve_disks:
            await storage.start_nbd_tunnelled(dom)  # no port: NBD comes through tunnels
        return ""
    address = host.migration_address(params.listen_address)
    port = host.acquire_port()
    dom.migration.port = port
    dom.migration.resumed = 0.0
    listen = f"[{address}]" if ":" in address else address

    def setup(extra: dict[str, Any] | None, nbd_creds: str) -> list[QmpCommand]:
        out = mparams.commands(params, flags, source=False, extra=extra)
        out.append(("migrate-incoming", {"uri": f"tcp:{listen}:{port}"}))
        if serve_disks:
            out += storage.serve_nbd(host, dom, address, tls_creds=nbd_creds)
        return out

    if not use_tls:
        await host.lifecycle.start(dom, incoming=True, setup=setup(None, ""))
    else:
        await host.lifecycle.start(dom, incoming=True)
        extra = await mtls.enable(host.tls, dom, server=True)
        await dom.require_monitor().execute_all(setup(extra, mtls.MIGRATION_CREDS))
    return f"tcp:{listen}:{port}"


async def receive_tunnel(
    dom: QemuDomain,
    session: str,
    take: mtunnel.Hijack | None,
    stream: str = mtunnel.MIGRATION_STREAM,
) -> None:
    """
    Splice the source daemon's connection and the incoming *dom*'s QEMU: its migration
    stream (once only), or a new connection to its NBD server (*stream* ``nbd``).

    :param session: The caller's session: the one that prepared *dom*, else refused.
    :param take: Takes over the request's connection (None: it asked no ``Upgrade``).
    """
    flags = MigrateFlags(dom.migration.flags)
    end = dom.migration.tunnel
    if stream not in mtunnel.STREAMS:
        raise VmferryError(ErrorCode.INVALID_ARG, f"no tunnel stream {stream[:40]!r}")
    nbd = stream == mtunnel.NBD_STREAM
    if (
        dom.job.async_job != AsyncJob.MIGRATION_IN
        or not flags & MigrateFlags.TUNNELLED
        or (end is None and not nbd)
        or (nbd and not dom.migration.nbd_socket)
    ):
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"no tunnelled migration of '{dom.name}' is waiting for its stream",
        )
    if not session or not hmac.compare_digest(session.encode(), dom.bound_session.encode()):
        raise VmferryError(
            ErrorCode.AUTH_FAILED,
            f"the tunnel of '{dom.name}' belongs to the session that prepared it",
        )
    if take is None:
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"the tunnel of '{dom.name}' is a raw pipe: ask with "
            f"'Connection: Upgrade' and 'Upgrade: {mtunnel.UPGRADE}'",
        )
    if nbd:
        end = storage.connect_nbd(dom)
    else:
        dom.migration.tunnel = None  # one stream per Prepare
    try:
        peer, early = take()
    except BaseException:
        end.close()
        raise
    try:
        await mtunnel.splice(end, peer, early)
    except (OSError, ConnectionError) as exc:
        # the answer went out already (101): nobody to tell but the log; the source sees it
        log.warning("tunnel of '%s' ended: %s", dom.name, exc)


def _prepare_cleanup(host: MigrationHost, dom: QemuDomain):  # type: ignore[no-untyped-def]
    async def cleanup() -> None:
        # The incoming QEMU died before Finish.
        _release(host, dom)
        await storage.delete_created(host, dom)
        storage.forget(dom)
        dom.job.finish_async()
        if dom.migration.created_here and dom.persistent is None:
            host.remove(dom)

    return cleanup


def _release(host: MigrationHost, dom: QemuDomain) -> None:
    if dom.migration.nbd_port:
        host.release_port(dom.migration.nbd_port)
        dom.migration.nbd_port = 0
    if dom.migration.port:
        host.release_port(dom.migration.port)
        dom.migration.port = 0
    if dom.migration.tunnel is not None:
        dom.migration.tunnel.close()
        dom.migration.tunnel = None
    storage.remove_nbd_socket(dom)
    host.unbind_session(dom)


async def discard_incoming(host: MigrationHost, dom: QemuDomain) -> None:
    """Undo a Prepare: kill the incoming QEMU, release what it held, end the job.

    The NBD server goes with QEMU; then the disks this migration created are deleted.
    """
    _release(host, dom)
    if dom.active:
        await host.lifecycle.stop(dom, ShutoffReason.FAILED)
    await storage.delete_created(host, dom)
    storage.forget(dom)
    dom.job.finish_async()
    if dom.migration.created_here and dom.persistent is None:
        host.remove(dom)
    elif dom.persistent is not None:
        dom.definition = dom.persistent


async def destroy_incoming(host: MigrationHost, dom: QemuDomain) -> None:
    """The connection that prepared *dom* closed before Finish (libvirt's autodestroy)."""
    if dom.job.async_job != AsyncJob.MIGRATION_IN or dom.job.owned:
        return
    if postcopy.in_postcopy(dom) and dom.active:
        # Switched over: the source cannot take the guest back, this side must keep it.
        log.warning("client of post-copy migration of %s went away: keeping the guest", dom.name)
        _release(host, dom)
        postcopy.mark_failed(dom)
        return
    if dom.job.async_started_by == PREPARE2_API and dom.active:
        # v2: the source kills itself once the stream is complete, so a complete
        # stream here is the only copy of the guest. Let the stream settle, then decide;
        # one that never started will not come.
        await dom.wait_for(
            lambda: (
                dom.migration.status not in (MigrationStatus.NONE, MigrationStatus.SETUP)
                or not dom.active
            ),
            STREAM_START_WAIT_S,
        )
        if dom.migration.status not in (MigrationStatus.NONE, MigrationStatus.SETUP):
            await dom.wait_for(
                lambda: dom.migration.status in TERMINAL or not dom.active,
                FINISH_WAIT_S,
            )
        if dom.migration.status == MigrationStatus.COMPLETED and dom.active:
            log.warning("client of v2 migration of %s left after the stream: resuming", dom.name)
            await finish(host, dom.name, None, cancelled=False, v3=False, api="autodestroy")
            return
    log.warning("client of incoming migration of %s went away: destroying it", dom.name)
    dom.job.start_phase(AsyncJob.MIGRATION_IN, MigrationPhase.FINISH3, "autodestroy")
    await discard_incoming(host, dom)


async def finish(
    host: MigrationHost,
    name: str,
    cookie_in: str | None,
    *,
    cancelled: bool,
    v3: bool = True,
    api: str = "migrate-finish",
) -> tuple[QemuDomain | None, str]:
    """Resume the guest that arrived, or kill it if the migration was cancelled.

    Returns the domain (None when cancelled) and the cookie for Confirm.
    """
    dom = host.lookup(name)
    phase = MigrationPhase.FINISH3 if v3 else MigrationPhase.FINISH2
    dom.job.start_phase(AsyncJob.MIGRATION_IN, phase, api)
    flags = MigrateFlags(dom.migration.flags)
    cookie = None
    if cancelled:
        if postcopy.in_postcopy(dom) and dom.active:
            _release(host, dom)
            postcopy.keep_failed(dom)
            raise postcopy.failed_error(dom, "Finish was cancelled after the switch-over")
        await discard_incoming(host, dom)
        return None, ""
    resumed_at: float | None = None
    try:
        if cookie_in:
            # Checked before anything happens; a bad cookie fails Finish like any error.
            cookie = parse_cookie(
                cookie_in,
                name=dom.migration.origin_name or dom.name,
                uuid=dom.uuid,
                local_hostuuid=host.host_uuid,
            )
        await failpoint("dst-finish-before")
        if flags & MigrateFlags.OFFLINE:
            _persist(host, dom, cookie, flags)
        else:
            resumed_at = await _finish_active(host, dom, cookie, flags, v3=v3)
    except BaseException:
        if postcopy.in_postcopy(dom) and dom.active:
            _release(host, dom)
            postcopy.keep_failed(dom)
            raise
        await discard_incoming(host, dom)
        raise
    _release(host, dom)
    storage.forget(dom)  # the guest runs on them here now: never deleted from here on
    if dom.job.async_job == AsyncJob.NONE:
        dom.save()
    else:
        dom.job.finish_async()  # its status write carries the lines above: one write, not two
    await failpoint("dst-finish-after")
    out = MigrationCookie(
        name=cookie.name if cookie else dom.name,
        uuid=dom.uuid,
        hostname=host.hostname,
        hostuuid=host.host_uuid,
    )
    dom.completed_job = _completed_here(cookie, postcopy=resumed_at is not None)
    out.statistics = _resume_report(dom)
    return dom, out.to_xml()


def _resume_report(dom: QemuDomain) -> dict[str, int]:
    """Finish's figures for the source: QEMU's downtime, and how long ago the guest resumed.

    The source adds the stop it saw (its clock) to the Finish reply's arrival
    (its clock) and takes off ``resumed_ago`` (this clock): the guest-visible
    downtime without comparing the two hosts' clocks. What it cannot know
    (the reply's way back) it leaves in, so the figure is an upper bound.
    """
    stats = dom.completed_job or {}
    out: dict[str, int] = {}
    if "downtime_ms" in stats:
        out["downtime"] = int(stats["downtime_ms"])
    if dom.migration.resumed and dom.state == DomainState.RUNNING:
        out["resumed_ago"] = max(0, int((time.time() - dom.migration.resumed) * 1000))
    return out


def _completed_here(cookie: MigrationCookie | None, *, postcopy: bool = False) -> dict[str, Any]:
    """The source's figures (QEMU's ``downtime_ms`` among them), as the source sent them.

    The guest-visible downtime (``guest_downtime_ms``) is the source's to tell,
    at Confirm: only it saw the guest stop.
    """
    sent = dict(cookie.statistics) if cookie is not None else {}
    stats: dict[str, Any] = from_cookie(sent)
    if cookie is not None:
        stats.update(cookie.policy)  # the source's convergence policy and its actions
    stats["status"] = MigrationStatus.COMPLETED.value
    if postcopy:
        stats["postcopy"] = 1
    if sent.get("started"):
        stats["time_elapsed_ms"] = max(0, int(time.time() * 1000) - sent["started"])
    return stats


async def _finish_active(
    host: MigrationHost,
    dom: QemuDomain,
    cookie: MigrationCookie | None,
    flags: MigrateFlags,
    *,
    v3: bool,
) -> float | None:
    """Resume the guest once its stream is over; after post-copy return when it resumed."""
    mon = dom.require_monitor()
    # Finish comes once the source sent everything, or did not say (v2, answer lost): a
    # stream that never even started will not come, no need to wait for it.
    waiting = (MigrationStatus.NONE, MigrationStatus.SETUP)  # setup: listening, no connection yet
    await dom.wait_for(
        lambda: dom.migration.status not in waiting or not mon.connected, STREAM_START_WAIT_S
    )
    if dom.migration.status in waiting and mon.connected:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"no migration stream of '{dom.name}' arrived: the source never started sending it",
        )
    over = (*TERMINAL, *postcopy.POSTCOPY_STATES)
    done = await dom.wait_for(
        lambda: dom.migration.status in over or not mon.connected, FINISH_WAIT_S
    )
    if not mon.connected:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"domain '{dom.name}' died while receiving the migration stream",
        )
    if dom.migration.status in postcopy.POSTCOPY_STATES:
        return await _finish_postcopy(host, dom, cookie, flags)
    if not done or dom.migration.status != MigrationStatus.COMPLETED:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"incoming migration of '{dom.name}' did not complete (status {dom.migration.status})",
        )
    # The source drained its mirrors before the device state came: the disks are whole.
    # The NBD server stops in the same batch as the ``cont`` below, before it.
    nbd_stop = storage.release_nbd(host, dom)
    await failpoint("dst-finish-storage")
    _persist(host, dom, cookie, flags)
    await mtls.disable(dom)  # the stream is over: QEMU forgets the credentials
    # libvirt's lockstate: the lease follows the guest before it may run (or sit paused) here.
    await host.take_lease(dom, previous=cookie.hostuuid if cookie else "")
    if flags & MigrateFlags.PAUSED:
        await storage.stop_nbd_with(dom, nbd_stop)
        dom.set_state(DomainState.PAUSED, PausedReason.USER)
        return None
    dom.pending_resume_reason = RunningReason.MIGRATED
    try:
        await storage.stop_nbd_with(dom, nbd_stop, ("cont", None))
    except VmferryError:
        if v3:
            raise
        log.error("v2 finish: could not resume %s; leaving it paused", dom.name)
        return None
    await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
    return None


async def _finish_postcopy(
    host: MigrationHost, dom: QemuDomain, cookie: MigrationCookie | None, flags: MigrateFlags
) -> float:
    """Run the guest here now, then wait until QEMU pulled the rest of its memory."""
    mon = dom.require_monitor()
    _persist(host, dom, cookie, flags)
    await host.take_lease(dom, previous=cookie.hostuuid if cookie else "")
    host.unbind_session(dom)  # from the cont on, losing the client must not destroy it
    dom.pending_resume_reason = RunningReason.POSTCOPY
    await mon.execute("cont")
    await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
    resumed_at = dom.migration.resumed or time.time()
    await failpoint("dst-postcopy-running")
    await wait_postcopy_end(dom)
    _mark_migrated(host, dom)
    return resumed_at


async def wait_postcopy_end(dom: QemuDomain) -> None:
    """Wait (unbounded) until QEMU completed the incoming post-copy stream.

    :raise VmferryError: post-copy broke (``postcopy-paused``, failed, QEMU gone).
    """
    mon = dom.require_monitor()
    await dom.wait_for(
        lambda: (
            dom.migration.status
            in (
                MigrationStatus.COMPLETED,
                MigrationStatus.FAILED,
                MigrationStatus.CANCELLED,
                MigrationStatus.POSTCOPY_PAUSED,
            )
            or not mon.connected
        ),
        None,
    )
    if not mon.connected:
        raise postcopy.failed_error(dom, "QEMU went away")
    if dom.migration.status != MigrationStatus.COMPLETED:
        raise postcopy.failed_error(dom, f"QEMU reports '{dom.migration.status}'")


def _mark_migrated(host: MigrationHost, dom: QemuDomain) -> None:
    # libvirt emits a second resumed/migrated event once post-copy completes.
    if dom.state == DomainState.RUNNING and dom.reason != RunningReason.MIGRATED:
        dom.set_state(DomainState.RUNNING, RunningReason.MIGRATED)
        host.lifecycle.emit(dom, EventType.RESUMED, str(RunningReason.MIGRATED), {})


def _persist(
    host: MigrationHost, dom: QemuDomain, cookie: MigrationCookie | None, flags: MigrateFlags
) -> None:
    if not flags & MigrateFlags.PERSIST_DEST:
        return
    definition: DomainDef = dom.definition
    if cookie is not None and cookie.persistent is not None:
        definition = replace(cookie.persistent, name=dom.name)
        host.check_definition(definition)
    host.persist_definition(definition)
    dom.persistent = definition


# -- post-copy resume -----------------------------------------------------------------------------


async def prepare_resume(
    host: MigrationHost,
    xml: str,
    cookie_in: str | None,
    flags: MigrateFlags,
    params: MigrationParams,
    *,
    session: str = "",
    api: str = "migrate-prepare",
) -> tuple[str, str]:
    """Listen for the resumed post-copy stream (``migrate-recover`` on a new port).

    Returns (URI the source must send to, cookie).
    """
    params.validate(flags)
    definition = parse_domain_xml(xml)
    original_name = definition.name
    if cookie_in is not None:
        parse_cookie(
            cookie_in, name=original_name, uuid=definition.uuid, local_hostuuid=host.host_uuid
        )
    dom = host.lookup(definition.uuid)
    await postcopy.take_over(dom)
    postcopy.check_resumable(dom, AsyncJob.MIGRATION_IN)
    dom.job.start_phase(AsyncJob.MIGRATION_IN, MigrationPhase.PREPARE_RESUME, api)
    try:
        await postcopy.pause(dom)
        address = host.migration_address(params.listen_address)
        listen = f"[{address}]" if ":" in address else address
        port = host.acquire_port()
        dom.migration.port = port
        uri = f"tcp:{listen}:{port}"
        await dom.require_monitor().execute("migrate-recover", {"uri": uri})
        if session:
            host.bind_session(session, dom)
    except BaseException:
        _release(host, dom)
        if dom.active:
            postcopy.keep_failed(dom)
        raise
    dom.job.continue_(cleanup=postcopy.end_job(dom))
    cookie = MigrationCookie(
        name=original_name, uuid=dom.uuid, hostname=host.hostname, hostuuid=host.host_uuid
    )
    return uri, cookie.to_xml()


async def finish_resume(
    host: MigrationHost,
    dom: QemuDomain,
    cookie_in: str | None,
    *,
    cancelled: bool,
    api: str = "migrate-finish",
) -> tuple[QemuDomain | None, str]:
    """Wait for the resumed post-copy stream to complete; a failure returns to postcopy_failed."""
    dom.job.start_phase(AsyncJob.MIGRATION_IN, MigrationPhase.FINISH_RESUME, api)
    if cancelled:
        _release(host, dom)
        postcopy.keep_failed(dom)
        return None, ""
    try:
        mon = dom.require_monitor()
        # The source saw its side reconnect; this side's events may trail a little.
        await dom.wait_for(
            lambda: dom.migration.status != MigrationStatus.POSTCOPY_PAUSED or not mon.connected,
            postcopy.PAUSE_WAIT_S,
        )
        await wait_postcopy_end(dom)
    except BaseException:
        _release(host, dom)
        if dom.active:
            postcopy.keep_failed(dom)
        raise
    await complete_incoming(host, dom)
    out = MigrationCookie(
        name=dom.name, uuid=dom.uuid, hostname=host.hostname, hostuuid=host.host_uuid
    )
    out.statistics = _resume_report(dom)
    return dom, out.to_xml()


async def complete_incoming(host: MigrationHost, dom: QemuDomain) -> None:
    """The post-copy stream completed: the whole guest is here; end the job."""
    _release(host, dom)
    await mtls.disable(dom)
    try:
        if dom.state == DomainState.PAUSED:
            # Finish never ran (the source or client went away): the guest starts now.
            await host.take_lease(dom)
            dom.pending_resume_reason = RunningReason.MIGRATED
            await dom.require_monitor().execute("cont")
            await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
        else:
            _mark_migrated(host, dom)
        stats = dict(dom.completed_job or {})
        stats["status"] = MigrationStatus.COMPLETED.value
        dom.completed_job = stats
    finally:
        dom.job.finish_async()


async def complete_unattended(host: MigrationHost, dom: QemuDomain) -> None:
    """QEMU completed a failed post-copy migration nobody was resuming: finish it here."""
    log.info("domain %s: post-copy migration completed unattended", dom.name)
    dom.job.start_phase(AsyncJob.MIGRATION_IN, MigrationPhase.FINISH_RESUME, UNATTENDED_API)
    await complete_incoming(host, dom)
