"""The daemon's migration service: thin entry points over the migration layer.

libvirt's ``qemu_driver.c`` calling ``qemu_migration.c``: each API looks the
domain up, checks what the caller may ask, and calls a step of
:mod:`vmferry.migration`. The service is the migration layer's host
(:class:`~vmferry.migration.host.MigrationHost`): it answers for the
:class:`~vmferry.daemon.driver.Driver` it composes, and the driver reaches it
back only through its :class:`~vmferry.daemon.driver.JobHooks` (lost client
sessions, jobs a restart interrupted). Peer-to-peer runs in
:mod:`vmferry.migration.p2p`, post-copy supervision in
:mod:`vmferry.migration.postcopy_watch`, the peer probe in
:mod:`vmferry.migration.peer_probe`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from vmferry.api.models import JobStats, MigrationResult
from vmferry.daemon import migrate_disks
from vmferry.daemon.driver import Driver
from vmferry.daemon.observe import DESTINATION, SOURCE, MigrationObserver, bind_params
from vmferry.daemon.peer_client import ClientConnector, check_peer_uri
from vmferry.domain.model import DiskDef, DomainDef
from vmferry.domain.xml import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob, Job
from vmferry.migration import destination, p2p, postcopy, resolver, restart, source, storage
from vmferry.migration import policy as mpolicy
from vmferry.migration import uri as muri
from vmferry.migration.cookie import NbdDisk, parse_cookie
from vmferry.migration.flags import MigrateFlags, parse_flags
from vmferry.migration.host import Keepalive, PeerConnector, PerformLimits
from vmferry.migration.params import (
    MAX_BANDWIDTH_MIB_S,
    MAX_DOWNTIME_MS,
    MIB,
    UNLIMITED_BANDWIDTH,
    MigrationParams,
)
from vmferry.migration.peer_probe import MigrationPeer
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.postcopy_watch import PostcopyWatch
from vmferry.migration.stats import from_query_migrate
from vmferry.migration.tls import TlsSetup
from vmferry.migration.tunnel import Hijack, Sender
from vmferry.qemu import tls_creds
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.lifecycle import Lifecycle
from vmferry.qemu.migration_status import MigrationStatus

log = logging.getLogger(__name__)


class MigrationService:
    """Every migration API of the daemon, composed with its :class:`Driver`."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.insecure = False  # vmferryd --insecure: plain tcp:// and unix:// peers allowed
        self._peers = ClientConnector(driver.config)
        self._postcopy_watch = PostcopyWatch(self)
        self.observe = MigrationObserver()  # step times, results, the id in the logs
        driver.set_job_hooks(self)
        confine = driver.lifecycle.confine
        self._tls = TlsSetup(
            mode=driver.config.migration.tls,
            channels=driver.config.migration.tls_channels,
            pki_dir=driver.config.tls.pki_dir,
            staging=driver.state.root / tls_creds.STAGING_DIR,
            user=confine.user if confine is not None else None,
        )
        tls_creds.sweep(self._tls.staging)  # copies a crash left behind

    # -- the driver, as the migration layer needs it (vmferry.migration.host.MigrationHost) ---

    @property
    def lifecycle(self) -> Lifecycle:
        """The driver's QEMU lifecycle."""
        return self.driver.lifecycle

    @property
    def host_uuid(self) -> str:
        """This host's uuid."""
        return self.driver.host_uuid

    @property
    def hostname(self) -> str:
        """This host's name."""
        return self.driver.hostname

    def lookup(self, key: str) -> QemuDomain:
        """The domain named (or with uuid) *key*; ``NO_DOMAIN`` if there is none."""
        return self.driver.lookup(key)

    def check_clash(self, definition: DomainDef, *, allow_inactive_same: bool) -> QemuDomain | None:
        """The existing domain *definition* would replace, refused if it clashes."""
        return self.driver.check_clash(definition, allow_inactive_same=allow_inactive_same)

    def add(self, definition: DomainDef, persistent: DomainDef | None) -> QemuDomain:
        """Register a domain for *definition*."""
        return self.driver.add(definition, persistent)

    def remove(self, dom: QemuDomain) -> None:
        """Forget *dom* (it left this host)."""
        self.driver.remove(dom)

    def check_definition(self, definition: DomainDef) -> None:
        """Refuse a definition from another host that this host's QEMU may not run."""
        self.driver.check_definition(definition)

    def persist_definition(self, definition: DomainDef) -> None:
        """Write *definition* as the domain's persistent definition."""
        self.driver.persist_definition(definition)

    def unpersist_definition(self, dom: QemuDomain) -> None:
        """Remove *dom*'s persistent definition."""
        self.driver.unpersist_definition(dom)

    @property
    def lease_driver(self) -> str:
        """See MigrationHost."""
        return self.driver.leases.kind

    async def take_lease(self, dom: QemuDomain, *, previous: str = "") -> None:
        """See MigrationHost."""
        await self.driver.take_lease(dom, previous=previous)

    def release_lease(self, dom: QemuDomain) -> None:
        """See MigrationHost."""
        self.driver.leases.release(dom.uuid)

    async def lease_holder(self, uuid: str) -> str:
        """See MigrationHost."""
        owner = await self.driver.leases.holder(uuid)
        return owner.host_uuid if owner is not None else ""

    def acquire_port(self) -> int:
        """A free port of ``[migration] port_min..port_max``, reserved."""
        return self.driver.acquire_port()

    def release_port(self, port: int) -> None:
        """Give back a port of :meth:`acquire_port`."""
        self.driver.release_port(port)

    def bind_session(self, session: str, dom: QemuDomain) -> None:
        """Tie *dom*'s job to the client *session* (its close callback)."""
        self.driver.bind_session(session, dom)

    def unbind_session(self, dom: QemuDomain) -> None:
        """Untie *dom*'s job from its client session."""
        self.driver.unbind_session(dom)

    def dumpxml(self, dom: QemuDomain, *, migratable: bool, inactive: bool) -> str:
        """*dom*'s XML."""
        return self.driver.dumpxml(dom, migratable=migratable, inactive=inactive)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run *coro* in the background until it ends or the daemon stops."""
        self.driver.spawn(coro)

    @property
    def migration_peers(self) -> dict[str, MigrationPeer]:
        """Where each outgoing migration went, by domain uuid (persisted by the driver)."""
        return self.driver.migration_peers

    @property
    def keepalive(self) -> Keepalive:
        """``[keepalive]``: how this daemon probes a peer daemon."""
        ka = self.driver.config.keepalive
        return Keepalive(interval=ka.interval, count=ka.count)

    @property
    def peers(self) -> PeerConnector:
        """Connections to other daemons (an :class:`~vmferry.client.AsyncClient` each)."""
        return self._peers

    @property
    def postcopy_watch(self) -> PostcopyWatch:
        """The post-copy watchers of this host."""
        return self._postcopy_watch

    # -- what a client may make this daemon reach (vmferry.migration.uri) ---------------------

    @property
    def allowed_networks(self) -> list[muri.IPNetwork]:
        """``[migration] allowed_networks``: where a client may make this daemon connect."""
        return muri.parse_networks(self.driver.config.migration.allowed_networks)

    @property
    def perform_limits(self) -> PerformLimits:
        """``[migration] perform_stall_timeout`` and ``perform_timeout``."""
        mig = self.driver.config.migration
        return PerformLimits(stall_s=mig.perform_stall_timeout, total_s=mig.perform_timeout)

    @property
    def tls(self) -> TlsSetup:
        """``[migration] tls`` and ``[tls] pki_dir`` (vmferry.migration.tls)."""
        return self._tls

    @property
    def convergence(self) -> mpolicy.ConvergenceDefaults:
        """``[migration] downtime_target_ms``, ``deadline_s``, ``policy``: the default contract."""
        mig = self.driver.config.migration
        return mpolicy.ConvergenceDefaults(
            downtime_target_ms=mig.downtime_target_ms, deadline_s=mig.deadline_s, policy=mig.policy
        )

    async def stream_uri(self, uri: str) -> str:
        """Whoever gave *uri* (a client, a p2p destination's Prepare): tcp to an allowed network."""
        return await muri.checked_stream_uri(uri, self.allowed_networks)

    async def check_peer(self, uri: str, what: str) -> None:
        """*uri* of another daemon a client asks this one to call (refused unless allowed)."""
        await check_peer_uri(uri, self.allowed_networks, insecure=self.insecure, what=what)

    def migration_address(self, requested: str) -> str:
        """Where the incoming QEMU listens: a client's choice only if the admin allows it."""
        default = self.driver.config.migration.listen_address or "127.0.0.1"
        if not requested:
            return default
        muri.check_host(requested, "listen address")
        allowed = self.driver.config.migration.allowed_listen_addresses or [default]
        if not any(_same_address(requested, a) for a in allowed):
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"listen address '{requested}' is not allowed on this host "
                f"([migration] allowed_listen_addresses: {', '.join(allowed)})",
            )
        return requested

    # -- storage migration: this host's copies of the disks ----------------------------------

    def disk_path(self, disk: DiskDef) -> str:
        """Where *disk*'s data is on this host."""
        return migrate_disks.disk_path(self.driver.pools, disk)

    def disk_exists(self, path: str) -> bool:
        return migrate_disks.disk_exists(path)

    async def create_disk(self, path: str, disk: DiskDef, copied: NbdDisk) -> bool:
        """Create a disk the source copies here (a volume of a pool, or a file below a root)."""
        if disk.type == "volume":
            return await migrate_disks.create_volume(
                self.driver.pools, disk, copied.capacity, copied.backing, copied.backing_format
            )
        return await migrate_disks.create_disk(
            self.driver.lifecycle.confine,
            path,
            disk,
            copied.capacity,
            backing=copied.backing,
            backing_format=copied.backing_format,
        )

    async def delete_disk(self, path: str) -> None:
        migrate_disks.delete_disk(path)

    # -- each source step, for both protocols' callers (the HTTP API and p2p) -----------------

    async def source_begin(
        self, dom: QemuDomain, flags: MigrateFlags, params: MigrationParams, session: str = ""
    ) -> tuple[str, str]:
        """Begin on this, the source host (of a post-copy resume with ``POSTCOPY_RESUME``)."""
        if flags & MigrateFlags.POSTCOPY_RESUME:
            with self.observe.step(SOURCE, "begin", dom):
                return await source.begin_resume(self, dom, flags, params, session=session)
        bind_params(params)
        with self.observe.step(SOURCE, "begin", dom, flags=int(flags), first=True):
            return await source.begin(self, dom, flags, params, session=session)

    async def source_perform(
        self, dom: QemuDomain, cookie: str, uri: str, *, tunnel: Sender | None = None
    ) -> str:
        """Perform (or its resume); watches a migration that switched to post-copy."""
        with self.observe.step(SOURCE, "perform", dom):
            if _resuming(dom, AsyncJob.MIGRATION_OUT):
                return await source.perform_resume(self, dom, cookie, uri)
            out = await source.perform3(self, dom, cookie, uri, tunnel=tunnel)
        if postcopy.in_postcopy(dom):
            self._postcopy_watch.watch(dom)  # from the switch-over on, until the job ends
        return out

    async def source_confirm(self, dom: QemuDomain, cookie: str, *, cancelled: bool) -> None:
        """Confirm (or its resume); watches a post-copy migration that failed."""
        with self.observe.step(SOURCE, "confirm", dom, final=True, cancelled=cancelled):
            if _resuming(dom, AsyncJob.MIGRATION_OUT):
                await source.confirm_resume(self, dom, cookie, cancelled=cancelled)
            else:
                await source.confirm3(self, dom, cookie, cancelled=cancelled)
        if dom.job.async_job == AsyncJob.MIGRATION_OUT and postcopy.failed(dom):
            self._postcopy_watch.watch(dom)

    # -- protocol steps (client-managed migration calls these one by one) ---------------------

    async def migrate_begin(
        self, name: str, flags: int, params: dict[str, Any], session: str
    ) -> tuple[str, str]:
        """``migrate/begin``: Begin3 (or its resume), bound to *session*; (XML, cookie)."""
        dom = self.lookup(name)
        mflags = parse_flags(flags)
        if not mflags & MigrateFlags.POSTCOPY_RESUME:
            self.migration_peers.pop(dom.uuid, None)  # Perform names this migration's peer
        return await self.source_begin(
            dom,
            mflags | MigrateFlags.CHANGE_PROTECTION,
            MigrationParams.from_dict(params),
            session=session,
        )

    async def migrate_prepare(
        self, xml: str, cookie: str | None, flags: int, params: dict[str, Any], session: str
    ) -> tuple[str, str]:
        """``migrate/prepare``: Prepare3 or Prepare2 on the destination; (URI, cookie)."""
        mflags = parse_flags(flags)
        mparams = MigrationParams.from_dict(params)
        bind_params(mparams)
        self.migration_address(mparams.listen_address)  # refused before anything is made
        if mflags & MigrateFlags.POSTCOPY_RESUME:
            with self.observe.step(DESTINATION, "prepare", find=self._incoming(xml, mparams)):
                return await destination.prepare_resume(
                    self, xml, cookie, mflags, mparams, session=session
                )
        # A migration already half here (post-copy resume) may finish; a new one may not come.
        self.driver.maintenance.check("incoming migration")
        with self.observe.step(
            DESTINATION, "prepare", find=self._incoming(xml, mparams), flags=flags, first=True
        ):
            uri, out = await destination.prepare(
                self, xml, cookie, mflags, mparams, session=session
            )
        self._reap_unclaimed(xml, mparams)
        return uri, out

    async def migrate_perform(self, name: str, cookie: str, uri: str, peer_uri: str = "") -> str:
        """``migrate/perform``: Perform3; *peer_uri*: the destination daemon, for recovery."""
        dom = self.lookup(name)
        if peer_uri:
            await self.check_peer(peer_uri, "peer")
            dname = dom.migration.params.dname if dom.migration.params is not None else ""
            self._record_peer(dom, peer_uri, self._peer_host_uuid(dom, cookie), dname=dname)
        session = dom.bound_session
        self.unbind_session(dom)  # libvirt drops the close callback while Perform runs
        try:
            return await self.source_perform(dom, cookie, uri)
        finally:
            job = dom.job
            kept = job.phase == MigrationPhase.PERFORM3_DONE or _resuming(
                dom, AsyncJob.MIGRATION_OUT
            )
            if session and kept and not job.owned:
                if self.driver.sessions.is_open(session):
                    self.bind_session(session, dom)  # ... and registers it again after Perform
                else:
                    # The client left while Perform ran: nobody will Finish or Confirm.
                    self.spawn(self.session_lost(dom))

    def _incoming(self, xml: str, params: MigrationParams) -> Callable[[], QemuDomain | None]:
        """The domain a Prepare of *xml* made (None if there is none, e.g. it failed)."""

        def find() -> QemuDomain | None:
            try:
                return self.lookup(params.dname or parse_domain_xml(xml).name)
            except VmferryError:
                return None

        return find

    def _reap_unclaimed(self, xml: str, params: MigrationParams) -> None:
        """Destroy an incoming migration nobody claims within ``[migration] prepare_timeout``.

        One prepared with a session goes when the session closes; one prepared
        without (or whose session is gone) goes once its stream is not moving
        after the timeout, so stray Prepares cannot pile up QEMUs and ports.
        """
        dom = self.lookup(params.dname or parse_domain_xml(xml).name)
        started = dom.job.async_started
        timeout = self.driver.config.migration.prepare_timeout

        def ours() -> bool:
            job = dom.job
            return (
                job.async_job == AsyncJob.MIGRATION_IN
                and job.phase == MigrationPhase.PREPARE
                and job.async_started == started
            )

        async def reap() -> None:
            while True:
                await asyncio.sleep(timeout)
                if not ours():
                    return  # finished, cancelled or replaced meanwhile
                if dom.bound_session and self.driver.sessions.is_open(dom.bound_session):
                    return  # its session's close callback takes care of it
                if dom.job.owned or dom.migration.status in _STREAM_MOVING:
                    continue  # a step runs or the stream arrives: look again later
                log.warning(
                    "incoming migration of %s was not claimed within %g s: destroying it",
                    dom.name,
                    timeout,
                )
                try:
                    await destination.destroy_incoming(self, dom)
                except Exception:
                    log.exception("destroying the unclaimed incoming migration of %s", dom.name)
                return

        self.spawn(reap())

    def _record_peer(self, dom: QemuDomain, uri: str, host_uuid: str, *, dname: str) -> None:
        """Remember (persisted with the next status save) where *dom* is migrating to."""
        name = dname or dom.name
        self.migration_peers[dom.uuid] = MigrationPeer(uri=uri, name=name, host_uuid=host_uuid)

    def _peer_host_uuid(self, dom: QemuDomain, cookie: str) -> str:
        try:
            parsed = parse_cookie(
                cookie, name=dom.name, uuid=dom.uuid, local_hostuuid=self.host_uuid
            )
        except VmferryError:
            return ""  # Perform refuses this cookie itself
        return parsed.hostuuid

    async def migrate_perform2(
        self, name: str, uri: str, flags: int, params: dict[str, Any], peer_uri: str = ""
    ) -> None:
        """``migrate/perform2``: v2's Perform (no Confirm follows)."""
        dom = self.lookup(name)
        mflags = parse_flags(flags)
        mparams = MigrationParams.from_dict(params)
        bind_params(mparams)
        if peer_uri:
            await self.check_peer(peer_uri, "peer")
            self._record_peer(dom, peer_uri, "", dname=mparams.dname)
        else:
            self.migration_peers.pop(dom.uuid, None)
        with self.observe.step(SOURCE, "perform", dom, flags=flags, first=True, final=True):
            await source.perform2(self, dom, uri, mflags, mparams)

    async def migrate_finish(self, name: str, cookie: str | None, cancelled: bool, v3: bool) -> str:
        """``migrate/finish``: Finish3 or Finish2 on the destination; the cookie out."""
        dom = self.lookup(name)
        try:
            with self.observe.step(DESTINATION, "finish", dom, final=True, cancelled=cancelled):
                if _resuming(dom, AsyncJob.MIGRATION_IN):
                    _, out = await destination.finish_resume(self, dom, cookie, cancelled=cancelled)
                else:
                    _, out = await destination.finish(
                        self, name, cookie, cancelled=cancelled, v3=v3
                    )
        except VmferryError:
            if dom.job.async_job == AsyncJob.MIGRATION_IN and postcopy.failed(dom):
                self._postcopy_watch.watch(dom)  # QEMU may still complete it unattended
            raise
        return out

    async def migrate_tunnel(
        self, name: str, session: str, take: Hijack | None, stream: str = ""
    ) -> None:
        """A tunnel of the incoming *name*: the source daemon's upgraded connection."""
        await destination.receive_tunnel(self.lookup(name), session, take, stream)

    async def migrate_confirm(self, name: str, cookie: str, cancelled: bool) -> None:
        """``migrate/confirm``: Confirm3 on the source."""
        await self.source_confirm(self.lookup(name), cookie, cancelled=cancelled)

    # -- post-copy -----------------------------------------------------------------------------

    async def start_postcopy(self, dom: QemuDomain) -> None:
        """``migrate-postcopy``: switch the running outgoing migration to post-copy."""
        await postcopy.start(dom)

    # -- peer-to-peer ------------------------------------------------------------------------

    async def migrate_p2p(
        self, name: str, dest_uri: str, flags: int, params: dict[str, Any]
    ) -> MigrationResult:
        """Run the whole protocol from here against the destination daemon (p2p)."""
        mflags = parse_flags(flags)
        mparams = MigrationParams.from_dict(params)
        bind_params(mparams)  # before the destination's Prepare: it carries the id there
        times = await p2p.migrate(self, name, dest_uri, mflags, mparams)
        return MigrationResult(steps=times.steps, stats=self.completed_stats(name))

    def completed_stats(self, name: str) -> dict[str, Any]:
        dom = next((d for d in self.driver.domains() if d.name == name), None)
        return (
            dict(dom.completed_job or {})
            if dom is not None
            else dict(self.driver.last_completed.get(name, {}))
        )

    # -- queries and tuning while a migration runs -------------------------------------------

    async def job_info(self, dom: QemuDomain, *, completed: bool) -> JobStats:
        """``domjobinfo``: the running outgoing migration's statistics, or the last job's."""
        if completed:
            done = dom.completed_job or {}
            return JobStats(type="completed" if done else "none", stats=dict(done))
        if dom.job.async_job == AsyncJob.MIGRATION_IN:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                "migration statistics are available only on the source host",
            )
        async with dom.job.acquire(Job.QUERY, "domjobinfo"):
            if dom.job.async_job != AsyncJob.MIGRATION_OUT:
                return JobStats()
            stats: dict[str, Any] = {"status": dom.migration.status}
            mon = dom.monitor
            if mon is not None and dom.migration.status not in (
                MigrationStatus.NONE,
                MigrationStatus.SETUP,
            ):
                info = await mon.execute("query-migrate")
                stats = from_query_migrate(info, started=dom.migration.started)
                stats.update(mpolicy.live_stats(dom))  # prediction and ETA
            if dom.block_jobs:  # the disks' mirrors: before and while the memory moves
                stats = storage.with_disk(stats, await storage.progress(dom))
            return JobStats(
                type="unbounded",
                operation="outgoing migration",
                phase=dom.job.phase.name.lower() if dom.job.phase is not None else "none",
                stats=stats,
            )

    async def job_abort(self, dom: QemuDomain, *, postcopy_pause: bool = False) -> None:
        """``domjobabort``; with *postcopy_pause* (``--postcopy``) pause a post-copy migration."""
        if dom.job.async_job == AsyncJob.MIGRATION_IN:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                "cannot abort incoming migration; use destroy instead",
            )
        async with dom.job.acquire(Job.ABORT, "domjobabort"):
            if dom.job.async_job == AsyncJob.NONE:
                raise VmferryError(ErrorCode.OPERATION_INVALID, "no job is active on the domain")
            if postcopy.in_postcopy(dom):
                if not postcopy_pause:
                    raise VmferryError(
                        ErrorCode.OPERATION_INVALID, "cannot abort migration in post-copy mode"
                    )
                # The administrator wants it paused: no automatic resume behind their back.
                dom.migration.params = (dom.migration.params or MigrationParams()).copy(
                    postcopy_autoresume=False
                )
                await postcopy.pause(dom)
                if not dom.job.owned:
                    postcopy.mark_failed(dom)
                dom.save()
                return
            if postcopy_pause:
                raise VmferryError(
                    ErrorCode.OPERATION_INVALID,
                    "current job is not outgoing migration in post-copy mode",
                )
            dom.job.request_abort()
            dom.notify()
            if dom.monitor is not None and dom.migration.status not in (
                MigrationStatus.NONE,
                MigrationStatus.COMPLETED,
            ):
                await source.cancel_stream(dom)

    async def set_max_downtime(self, dom: QemuDomain, downtime_ms: int) -> None:
        """``migrate-setmaxdowntime``: QEMU's downtime limit for the running migration."""
        if not 0 < downtime_ms <= MAX_DOWNTIME_MS:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"downtime must be a positive number of ms, at most {MAX_DOWNTIME_MS}",
            )
        async with dom.job.acquire(Job.MIGRATION_OP, "migrate-setmaxdowntime"):
            await dom.require_monitor().execute(
                "migrate-set-parameters", {"downtime-limit": downtime_ms}
            )

    async def get_max_downtime(self, dom: QemuDomain) -> int:
        """``migrate-getmaxdowntime``: QEMU's current downtime limit, in ms."""
        async with dom.job.acquire(Job.QUERY, "migrate-getmaxdowntime"):
            params = await dom.require_monitor().execute("query-migrate-parameters")
            return int(params.get("downtime-limit", 300))

    async def set_speed(self, dom: QemuDomain, bandwidth_mib_s: int) -> None:
        """``migrate-setspeed``: the cap in MiB/s (0: unlimited), kept for the next migration."""
        if not 0 <= bandwidth_mib_s <= MAX_BANDWIDTH_MIB_S:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"bandwidth must be between 0 (unlimited) and {MAX_BANDWIDTH_MIB_S} MiB/s",
            )
        value = bandwidth_mib_s * MIB if bandwidth_mib_s else UNLIMITED_BANDWIDTH
        async with dom.job.acquire(Job.MIGRATION_OP, "migrate-setspeed"):
            # Kept for the next migration too, as libvirt does for an idle domain.
            dom.max_speed_mib_s = bandwidth_mib_s
            if dom.job.async_job == AsyncJob.MIGRATION_OUT and dom.monitor is not None:
                await dom.monitor.execute("migrate-set-parameters", {"max-bandwidth": value})

    async def get_speed(self, dom: QemuDomain) -> int:
        """``migrate-getspeed``: the bandwidth cap in MiB/s (0: unlimited)."""
        async with dom.job.acquire(Job.QUERY, "migrate-getspeed"):
            if dom.job.async_job != AsyncJob.MIGRATION_OUT or dom.monitor is None:
                return dom.max_speed_mib_s
            params = await dom.monitor.execute("query-migrate-parameters")
            value = int(params.get("max-bandwidth", 0))
            return 0 if value >= UNLIMITED_BANDWIDTH else value // MIB

    # -- close callbacks ----------------------------------------------------------------------

    async def session_lost(self, dom: QemuDomain) -> None:
        """*dom*'s client session closed: settle its job (libvirt's close callback)."""
        job = dom.job
        if job.owned:
            return
        if job.async_job == AsyncJob.MIGRATION_IN:
            await destination.destroy_incoming(self, dom)  # keeps a switched-over guest
            if dom.job.async_job == AsyncJob.MIGRATION_IN and postcopy.failed(dom):
                self._postcopy_watch.watch(dom)
        elif job.async_job == AsyncJob.MIGRATION_OUT:
            if postcopy.in_postcopy(dom):
                log.warning("client left during post-copy of %s: the job is kept", dom.name)
                if dom.active:
                    postcopy.mark_failed(dom)
                self._postcopy_watch.watch(dom)
            elif job.phase == MigrationPhase.BEGIN3:
                log.warning("client left after Begin of %s: dropping the job", dom.name)
                job.finish_async()
            elif job.phase == MigrationPhase.PERFORM3_DONE:
                # Finish's outcome is unknown: libvirt leaves the guest paused; ask the peer.
                log.warning("client left after Perform of %s: asking the destination", dom.name)
                resolver.settle(self, dom)

    # -- recovery after a restart ------------------------------------------------------------

    async def recover_job(self, dom: QemuDomain, job: dict[str, Any]) -> None:
        """Resolve *dom*'s job a restart interrupted (:mod:`vmferry.migration.restart`)."""
        if not dom.active:
            await restart.recover_gone(self, dom)
            return
        await restart.recover(self, dom)


# Incoming stream states in which an unclaimed Prepare is still making progress.
_STREAM_MOVING = frozenset(
    {
        MigrationStatus.ACTIVE,
        MigrationStatus.DEVICE,
        MigrationStatus.PRE_SWITCHOVER,
        *postcopy.POSTCOPY_STATES,
    }
)


def _same_address(a: str, b: str) -> bool:
    ia, ib = muri.ip_literal(a), muri.ip_literal(b)
    if ia is not None and ib is not None:
        return ia == ib
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def _resuming(dom: QemuDomain, async_job: AsyncJob) -> bool:
    """Whether *dom*'s *async_job* is resuming a failed post-copy migration."""
    phase = dom.job.phase
    return dom.job.is_active(async_job) and isinstance(phase, MigrationPhase) and phase.is_resume
