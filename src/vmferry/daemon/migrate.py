"""Migration APIs of the daemon: the protocol steps, peer-to-peer, job info, abort, tuning.

Post-copy: once a Perform returns switched over, the source daemon watches the
migration until its job ends (:func:`vmferry.migration.recovery.watch_outgoing`):
it pauses a stream that went silent, marks the job ``postcopy_failed``, and
resumes it peer-to-peer by itself whenever the destination daemon answers
(unless ``postcopy_autoresume`` is off); a destination whose Finish failed in
post-copy completes the migration when QEMU does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from vmferry.api.models import JobStats, MigrationResult
from vmferry.daemon.driver import Driver
from vmferry.daemon.peer_uri import check_peer_uri
from vmferry.domain.xml import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob, Job
from vmferry.migration import destination, postcopy, recovery, source
from vmferry.migration import policy as mpolicy
from vmferry.migration import uri as muri
from vmferry.migration.cookie import parse_cookie, same_uuid
from vmferry.migration.flags import MigrateFlags, parse_flags
from vmferry.migration.host import PerformLimits
from vmferry.migration.params import (
    MAX_BANDWIDTH_MIB_S,
    MAX_DOWNTIME_MS,
    MIB,
    UNLIMITED_BANDWIDTH,
    MigrationParams,
)
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.protocol import DestinationSide, StepTimes, migrate_v2, migrate_v3
from vmferry.migration.recovery import MigrationPeer, PeerAnswer, PeerProbe, ResumeAttempt
from vmferry.migration.stats import from_query_migrate
from vmferry.qemu.domain import QemuDomain

if TYPE_CHECKING:
    from vmferry.client import AsyncClient

log = logging.getLogger(__name__)

T = TypeVar("T")

# Every call to another daemon is bounded (Finish's own minimum is longer: it waits for the stream).
PEER_CALL_TIMEOUT_S = 60.0
# One question to the destination while resolving an interrupted migration.
PEER_PROBE_TIMEOUT_S = 5.0


class LocalSource:
    """The source side of the protocol, called in-process (peer-to-peer)."""

    def __init__(self, driver: MigrationDriver) -> None:
        self._driver = driver

    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        return await self._driver.source_begin(self._driver.lookup(name), flags, params)

    async def perform(self, name: str, cookie: str, uri: str) -> str:
        return await self._driver.source_perform(self._driver.lookup(name), cookie, uri)

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None:
        await self._driver.source_confirm(self._driver.lookup(name), cookie, cancelled=cancelled)

    async def dumpxml(self, name: str) -> str:
        return self._driver.dumpxml(self._driver.lookup(name), migratable=True, inactive=False)

    async def perform2(
        self, name: str, uri: str, flags: MigrateFlags, params: MigrationParams
    ) -> None:
        await source.perform2(self._driver, self._driver.lookup(name), uri, flags, params)


class MigrationDriver(Driver):
    """The domain driver plus every migration API."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._postcopy_watched: set[str] = set()  # uuids with a post-copy watcher running
        self.insecure = False  # vmferryd --insecure: plain tcp:// and unix:// peers allowed

    # -- what a client may make this daemon reach (vmferry.migration.uri) ---------------------

    @property
    def allowed_networks(self) -> list[muri.IPNetwork]:
        return muri.parse_networks(self.config.migration.allowed_networks)

    @property
    def perform_limits(self) -> PerformLimits:
        mig = self.config.migration
        return PerformLimits(stall_s=mig.perform_stall_timeout, total_s=mig.perform_timeout)

    async def stream_uri(self, uri: str) -> str:
        """Whoever gave *uri* (a client, a p2p destination's Prepare): tcp to an allowed network."""
        return await muri.checked_stream_uri(uri, self.allowed_networks)

    async def check_peer(self, uri: str, what: str) -> None:
        """*uri* of another daemon a client asks this one to call (refused unless allowed)."""
        await check_peer_uri(uri, self.allowed_networks, insecure=self.insecure, what=what)

    def migration_address(self, requested: str) -> str:
        """Where the incoming QEMU listens: a client's choice only if the admin allows it."""
        default = self.config.migration.listen_address or "127.0.0.1"
        if not requested:
            return default
        muri.check_host(requested, "listen address")
        allowed = self.config.migration.allowed_listen_addresses or [default]
        if not any(_same_address(requested, a) for a in allowed):
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"listen address '{requested}' is not allowed on this host "
                f"([migration] allowed_listen_addresses: {', '.join(allowed)})",
            )
        return requested

    # -- each source step, for both protocols' callers (the HTTP API and p2p) -----------------

    async def source_begin(
        self, dom: QemuDomain, flags: MigrateFlags, params: MigrationParams, session: str = ""
    ) -> tuple[str, str]:
        if flags & MigrateFlags.POSTCOPY_RESUME:
            return await source.begin_resume(self, dom, flags, params, session=session)
        return await source.begin(self, dom, flags, params, session=session)

    async def source_perform(self, dom: QemuDomain, cookie: str, uri: str) -> str:
        if _resuming(dom, AsyncJob.MIGRATION_OUT):
            return await source.perform_resume(self, dom, cookie, uri)
        out = await source.perform3(self, dom, cookie, uri)
        if postcopy.in_postcopy(dom):
            self._watch_postcopy(dom)  # from the switch-over on, until the job ends
        return out

    async def source_confirm(self, dom: QemuDomain, cookie: str, *, cancelled: bool) -> None:
        if _resuming(dom, AsyncJob.MIGRATION_OUT):
            await source.confirm_resume(self, dom, cookie, cancelled=cancelled)
        else:
            await source.confirm3(self, dom, cookie, cancelled=cancelled)
        if dom.job.async_job == AsyncJob.MIGRATION_OUT and postcopy.failed(dom):
            self._watch_postcopy(dom)

    # -- protocol steps (client-managed migration calls these one by one) ---------------------

    async def migrate_begin(
        self, name: str, flags: int, params: dict[str, Any], session: str
    ) -> tuple[str, str]:
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
        mflags = parse_flags(flags)
        mparams = MigrationParams.from_dict(params)
        self.migration_address(mparams.listen_address)  # refused before anything is made
        if mflags & MigrateFlags.POSTCOPY_RESUME:
            return await destination.prepare_resume(
                self, xml, cookie, mflags, mparams, session=session
            )
        uri, out = await destination.prepare(self, xml, cookie, mflags, mparams, session=session)
        self._reap_unclaimed(xml, mparams)
        return uri, out

    async def migrate_perform(self, name: str, cookie: str, uri: str, peer_uri: str = "") -> str:
        dom = self.lookup(name)
        if peer_uri:
            await self.check_peer(peer_uri, "peer")
            dname = str(dom.migration.params.get("dname") or "")
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
                if self.sessions.is_open(session):
                    self.bind_session(session, dom)  # ... and registers it again after Perform
                else:
                    # The client left while Perform ran: nobody will Finish or Confirm.
                    self.spawn(self.session_lost(dom))

    def _reap_unclaimed(self, xml: str, params: MigrationParams) -> None:
        """Destroy an incoming migration nobody claims within ``[migration] prepare_timeout``.

        One prepared with a session goes when the session closes; one prepared
        without (or whose session is gone) goes once its stream is not moving
        after the timeout, so stray Prepares cannot pile up QEMUs and ports.
        """
        dom = self.lookup(params.dname or parse_domain_xml(xml).name)
        started = dom.job.async_started
        timeout = self.config.migration.prepare_timeout

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
                if dom.bound_session and self.sessions.is_open(dom.bound_session):
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
        dom = self.lookup(name)
        mflags = parse_flags(flags)
        mparams = MigrationParams.from_dict(params)
        if peer_uri:
            await self.check_peer(peer_uri, "peer")
            self._record_peer(dom, peer_uri, "", dname=mparams.dname)
        else:
            self.migration_peers.pop(dom.uuid, None)
        await source.perform2(self, dom, uri, mflags, mparams)

    async def migrate_finish(self, name: str, cookie: str | None, cancelled: bool, v3: bool) -> str:
        dom = self.lookup(name)
        try:
            if _resuming(dom, AsyncJob.MIGRATION_IN):
                _, out = await destination.finish_resume(self, dom, cookie, cancelled=cancelled)
            else:
                _, out = await destination.finish(self, name, cookie, cancelled=cancelled, v3=v3)
        except VmferryError:
            if dom.job.async_job == AsyncJob.MIGRATION_IN and postcopy.failed(dom):
                self._watch_postcopy(dom)  # QEMU may still complete it unattended
            raise
        return out

    async def migrate_confirm(self, name: str, cookie: str, cancelled: bool) -> None:
        await self.source_confirm(self.lookup(name), cookie, cancelled=cancelled)

    # -- post-copy -----------------------------------------------------------------------------

    async def start_postcopy(self, dom: QemuDomain) -> None:
        """``migrate-postcopy``: switch the running outgoing migration to post-copy."""
        await postcopy.start(dom)

    def _watch_postcopy(self, dom: QemuDomain) -> None:
        """Watch *dom*'s post-copy migration until its job ends (once per domain)."""
        if dom.uuid in self._postcopy_watched or not dom.active:
            return
        if dom.job.async_job == AsyncJob.MIGRATION_OUT:
            ka = self.config.keepalive
            watch = recovery.watch_outgoing(
                self,
                dom,
                interval=ka.interval if ka.interval > 0 else 5.0,
                stall_checks=ka.count,
                resume=self._resume_attempt(dom),
            )
        elif dom.job.async_job == AsyncJob.MIGRATION_IN:
            watch = recovery.watch_incoming(self, dom)
        else:
            return
        self._postcopy_watched.add(dom.uuid)

        async def run() -> None:
            try:
                await watch
            finally:
                self._postcopy_watched.discard(dom.uuid)

        self.spawn(run())

    def _resume_attempt(self, dom: QemuDomain) -> ResumeAttempt:
        """One automatic resume of *dom*'s failed post-copy migration, peer-to-peer."""

        async def attempt() -> bool:
            peer = self.migration_peers.get(dom.uuid)
            if peer is None or not dom.migration.params.get("postcopy_autoresume", True):
                return False
            if not await self._peer_answers(peer):
                return False
            flags = MigrateFlags(dom.migration.flags) | MigrateFlags.POSTCOPY_RESUME
            flags &= ~(MigrateFlags.PEER2PEER | MigrateFlags.CHANGE_PROTECTION)
            log.info("domain %s: %s answers again: resuming post-copy", dom.name, peer.uri)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await self.migrate_p2p(dom.name, peer.uri, int(flags), dict(dom.migration.params))
            except VmferryError as err:
                log.warning("domain %s: resuming post-copy failed: %s", dom.name, err.message)
                return False
            log.info(
                "domain %s: post-copy resumed and completed in %.2f s",
                dom.name,
                loop.time() - started,
            )
            return True

        return attempt

    async def _peer_answers(self, peer: MigrationPeer) -> bool:
        from vmferry.client import AsyncClient

        ka = self.config.keepalive
        timeout = min(PEER_PROBE_TIMEOUT_S, ka.interval) if ka.interval > 0 else 1.0
        try:
            async with AsyncClient(
                peer.uri, pki_dir=self.config.tls.pki_dir, timeout=timeout
            ) as client:
                host = await client.host(request_timeout=timeout)
        except (VmferryError, OSError):
            return False
        return not peer.host_uuid or host.uuid == peer.host_uuid

    # -- peer-to-peer ------------------------------------------------------------------------

    async def migrate_p2p(
        self, name: str, dest_uri: str, flags: int, params: dict[str, Any]
    ) -> MigrationResult:
        """Run the whole protocol from here against the destination daemon."""
        from vmferry.client import AsyncClient
        from vmferry.client.migrate import RemoteDestination, open_session

        mflags = parse_flags(flags) & ~MigrateFlags.PEER2PEER
        mparams = MigrationParams.from_dict(params)
        times = StepTimes()
        dom = self.lookup(name)
        await self.check_peer(dest_uri, "destination")
        async with AsyncClient(
            dest_uri, pki_dir=self.config.tls.pki_dir, timeout=PEER_CALL_TIMEOUT_S
        ) as dconn:
            host = await dconn.host()
            if same_uuid(host.uuid, self.host.uuid):
                raise VmferryError(
                    ErrorCode.OPERATION_INVALID,
                    f"Attempt to migrate guest to the same host {host.uuid}",
                )
            # Recorded before Begin persists the job: recovery must know whom to ask.
            self.migration_peers[dom.uuid] = MigrationPeer(
                uri=dest_uri, name=mparams.dname or name, host_uuid=host.uuid
            )
            dead = asyncio.Event()
            keepalive = asyncio.create_task(self._keepalive(dconn, dom, dead))
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(PEER_CALL_TIMEOUT_S):
                        session = await stack.enter_async_context(open_session(dconn))
                    dst = _WatchedDestination(RemoteDestination(dconn, session), dead, dest_uri)
                    run = migrate_v3 if "migration-v3" in host.features else migrate_v2
                    await run(LocalSource(self), dst, name, mflags, mparams, times=times)
            except TimeoutError:
                raise VmferryError(
                    ErrorCode.OPERATION_TIMEOUT,
                    f"destination host {dest_uri} did not open a session within "
                    f"{PEER_CALL_TIMEOUT_S:g} s",
                ) from None
            except VmferryError as err:
                self._settle_p2p_failure(dom)
                if dead.is_set():
                    ka = self.config.keepalive
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
        completed = self._completed_stats(name)
        return MigrationResult(steps=times.steps, stats=completed)

    async def _keepalive(self, dconn: AsyncClient, dom: QemuDomain, dead: asyncio.Event) -> None:
        """libvirt's keepalive on the p2p connection: declare the destination dead in bounded time.

        Probes ``/v1/host`` every ``keepalive.interval`` s; after ``keepalive.count``
        probes in a row without an answer, sets *dead* (every pending call to the
        destination fails) and cancels a migration whose data is moving.
        """
        interval, count = self.config.keepalive.interval, self.config.keepalive.count
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
                log.warning(
                    "keepalive %d/%d to %s failed: %s", misses, count, dconn.uri, err.message
                )
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
        log.error("destination %s is dead: no keepalive answer %d times", dconn.uri, count)
        dead.set()
        if dom.job.async_job == AsyncJob.MIGRATION_OUT and dom.job.phase == MigrationPhase.PERFORM3:
            with contextlib.suppress(VmferryError):
                await self.job_abort(dom)

    def _settle_p2p_failure(self, dom: QemuDomain) -> None:
        """A failed p2p run may leave the source in perform3_done (Finish's answer lost)."""
        job = dom.job
        if job.async_job != AsyncJob.MIGRATION_OUT or job.owned:
            return
        if postcopy.in_postcopy(dom):
            # Past the switch-over: nothing to resolve, the job is kept for a resume.
            if dom.active:
                postcopy.mark_failed(dom)
            self._watch_postcopy(dom)
        elif job.phase == MigrationPhase.PERFORM3_DONE:
            self._resolve(dom)

    def _resolve(self, dom: QemuDomain) -> None:
        """Settle *dom*'s outgoing migration in perform3_done (job not owned) via its peer."""
        peer = self.migration_peers.get(dom.uuid)
        probe = self._peer_probe(dom, peer) if peer is not None else None
        if not recovery.start_resolver(self, dom, probe, self.spawn):
            dom.job.set_phase(MigrationPhase.CONFIRM3_CANCELLED)
            dom.job.finish_async()

    def _peer_probe(self, dom: QemuDomain, peer: MigrationPeer) -> PeerProbe:
        """Ask *peer*'s daemon once where *dom* is (bounded by :data:`PEER_PROBE_TIMEOUT_S`)."""
        from vmferry.client import AsyncClient

        async def probe() -> PeerAnswer:
            try:
                async with AsyncClient(
                    peer.uri, pki_dir=self.config.tls.pki_dir, timeout=PEER_PROBE_TIMEOUT_S
                ) as client:
                    if peer.host_uuid and (await client.host()).uuid != peer.host_uuid:
                        log.error(
                            "%s is no longer host %s: cannot ask it", peer.uri, peer.host_uuid
                        )
                        return PeerAnswer.UNREACHABLE
                    info = await client.dominfo(peer.name)
            except VmferryError as err:
                if err.code == ErrorCode.NO_DOMAIN:
                    return PeerAnswer.ABSENT
                log.info("asking %s about %s: %s", peer.uri, dom.name, err.message)
                return PeerAnswer.UNREACHABLE
            except OSError as err:
                log.info("asking %s about %s: %s", peer.uri, dom.name, err)
                return PeerAnswer.UNREACHABLE
            return recovery.classify(
                info.state, info.job.async_job, same_uuid=info.uuid == dom.uuid
            )

        return probe

    def _completed_stats(self, name: str) -> dict[str, Any]:
        dom = next((d for d in self.domains() if d.name == name), None)
        return (
            dict(dom.completed_job or {})
            if dom is not None
            else dict(self.last_completed.get(name, {}))
        )

    # -- queries and tuning while a migration runs -------------------------------------------

    async def job_info(self, dom: QemuDomain, *, completed: bool) -> JobStats:
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
            if mon is not None and dom.migration.status not in ("none", "setup"):
                info = await mon.execute("query-migrate")
                stats = from_query_migrate(info, started=dom.migration.started)
                stats.update(mpolicy.live_stats(dom))  # prediction and ETA
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
                dom.migration.params["postcopy_autoresume"] = False
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
            if dom.monitor is not None and dom.migration.status not in ("none", "completed"):
                await source.cancel_stream(dom)

    async def set_max_downtime(self, dom: QemuDomain, downtime_ms: int) -> None:
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
        async with dom.job.acquire(Job.QUERY, "migrate-getmaxdowntime"):
            params = await dom.require_monitor().execute("query-migrate-parameters")
            return int(params.get("downtime-limit", 300))

    async def set_speed(self, dom: QemuDomain, bandwidth_mib_s: int) -> None:
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
        async with dom.job.acquire(Job.QUERY, "migrate-getspeed"):
            if dom.job.async_job != AsyncJob.MIGRATION_OUT or dom.monitor is None:
                return dom.max_speed_mib_s
            params = await dom.monitor.execute("query-migrate-parameters")
            value = int(params.get("max-bandwidth", 0))
            return 0 if value >= UNLIMITED_BANDWIDTH else value // MIB

    # -- close callbacks ----------------------------------------------------------------------

    async def session_lost(self, dom: QemuDomain) -> None:
        job = dom.job
        if job.owned:
            return
        if job.async_job == AsyncJob.MIGRATION_IN:
            await destination.destroy_incoming(self, dom)  # keeps a switched-over guest
            if dom.job.async_job == AsyncJob.MIGRATION_IN and postcopy.failed(dom):
                self._watch_postcopy(dom)
        elif job.async_job == AsyncJob.MIGRATION_OUT:
            if postcopy.in_postcopy(dom):
                log.warning("client left during post-copy of %s: the job is kept", dom.name)
                if dom.active:
                    postcopy.mark_failed(dom)
                self._watch_postcopy(dom)
            elif job.phase == MigrationPhase.BEGIN3:
                log.warning("client left after Begin of %s: dropping the job", dom.name)
                job.finish_async()
            elif job.phase == MigrationPhase.PERFORM3_DONE:
                # Finish's outcome is unknown: libvirt leaves the guest paused; ask the peer.
                log.warning("client left after Perform of %s: asking the destination", dom.name)
                self._resolve(dom)

    # -- recovery after a restart ------------------------------------------------------------

    async def recover_job(self, dom: QemuDomain, job: dict[str, Any]) -> None:
        if not dom.active:
            await recovery.recover_gone(self, dom)
            return
        peer = self.migration_peers.get(dom.uuid)
        probe = self._peer_probe(dom, peer) if peer is not None else None
        await recovery.recover(
            self, dom, probe=probe, spawn=self.spawn, keep_postcopy=self._watch_postcopy
        )


# Incoming stream states in which an unclaimed Prepare is still making progress.
_STREAM_MOVING = frozenset({"active", "device", "pre-switchover", *postcopy.POSTCOPY_STATES})


def _same_address(a: str, b: str) -> bool:
    ia, ib = muri.ip_literal(a), muri.ip_literal(b)
    if ia is not None and ib is not None:
        return ia == ib
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def _resuming(dom: QemuDomain, async_job: AsyncJob) -> bool:
    """Whether *dom*'s *async_job* is resuming a failed post-copy migration."""
    phase = dom.job.phase
    return dom.job.is_active(async_job) and isinstance(phase, MigrationPhase) and phase.is_resume


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
