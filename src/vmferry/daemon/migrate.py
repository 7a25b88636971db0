"""Migration APIs of the daemon: the protocol steps, peer-to-peer, job info, abort, tuning."""

from __future__ import annotations

import logging
from typing import Any

from vmferry.api.models import JobStats, MigrationResult
from vmferry.daemon.driver import Driver
from vmferry.domain.state import DomainState, PausedReason
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob, Job
from vmferry.migration import destination, source
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MIB, UNLIMITED_BANDWIDTH, MigrationParams
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.protocol import StepTimes, migrate_v2, migrate_v3
from vmferry.migration.stats import from_query_migrate
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)


class LocalSource:
    """The source side of the protocol, called in-process (peer-to-peer)."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    async def begin(
        self, name: str, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        return await source.begin(self._driver, self._driver.lookup(name), flags, params)

    async def perform(self, name: str, cookie: str, uri: str) -> str:
        return await source.perform3(self._driver, self._driver.lookup(name), cookie, uri)

    async def confirm(self, name: str, cookie: str, *, cancelled: bool) -> None:
        await source.confirm3(self._driver, self._driver.lookup(name), cookie, cancelled=cancelled)

    async def dumpxml(self, name: str) -> str:
        return self._driver.dumpxml(self._driver.lookup(name), migratable=True, inactive=False)

    async def perform2(
        self, name: str, uri: str, flags: MigrateFlags, params: MigrationParams
    ) -> None:
        await source.perform2(self._driver, self._driver.lookup(name), uri, flags, params)


class MigrationDriver(Driver):
    """The domain driver plus every migration API."""

    # -- protocol steps (client-managed migration calls these one by one) ---------------------

    async def migrate_begin(
        self, name: str, flags: int, params: dict[str, Any], session: str
    ) -> tuple[str, str]:
        dom = self.lookup(name)
        return await source.begin(
            self,
            dom,
            MigrateFlags(flags) | MigrateFlags.CHANGE_PROTECTION,
            MigrationParams.from_dict(params),
            session=session,
        )

    async def migrate_prepare(
        self, xml: str, cookie: str | None, flags: int, params: dict[str, Any], session: str
    ) -> tuple[str, str]:
        return await destination.prepare(
            self,
            xml,
            cookie,
            MigrateFlags(flags),
            MigrationParams.from_dict(params),
            session=session,
        )

    async def migrate_perform(self, name: str, cookie: str, uri: str) -> str:
        dom = self.lookup(name)
        self.unbind_session(dom)  # libvirt drops the close callback while Perform runs
        return await source.perform3(self, dom, cookie, uri)

    async def migrate_perform2(
        self, name: str, uri: str, flags: int, params: dict[str, Any]
    ) -> None:
        await source.perform2(
            self, self.lookup(name), uri, MigrateFlags(flags), MigrationParams.from_dict(params)
        )

    async def migrate_finish(self, name: str, cookie: str | None, cancelled: bool, v3: bool) -> str:
        _, out = await destination.finish(self, name, cookie, cancelled=cancelled, v3=v3)
        return out

    async def migrate_confirm(self, name: str, cookie: str, cancelled: bool) -> None:
        await source.confirm3(self, self.lookup(name), cookie, cancelled=cancelled)

    # -- peer-to-peer ------------------------------------------------------------------------

    async def migrate_p2p(
        self, name: str, dest_uri: str, flags: int, params: dict[str, Any]
    ) -> MigrationResult:
        """Run the whole protocol from here against the destination daemon."""
        from vmferry.client import AsyncClient
        from vmferry.client.migrate import RemoteDestination, open_session

        mflags = MigrateFlags(flags) & ~MigrateFlags.PEER2PEER
        mparams = MigrationParams.from_dict(params)
        times = StepTimes()
        async with AsyncClient(dest_uri, pki_dir=self.config.tls.pki_dir) as dconn:
            host = await dconn.host()
            if host.uuid == self.host.uuid:
                raise VmferryError(
                    ErrorCode.OPERATION_INVALID,
                    f"Attempt to migrate guest to the same host {host.uuid}",
                )
            async with open_session(dconn) as session:
                dst = RemoteDestination(dconn, session)
                if "migration-v3" in host.features:
                    await migrate_v3(LocalSource(self), dst, name, mflags, mparams, times=times)
                else:
                    await migrate_v2(LocalSource(self), dst, name, mflags, mparams, times=times)
        completed = self._completed_stats(name)
        return MigrationResult(steps=times.steps, stats=completed)

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
            done = dom.completed_job or self.last_completed.get(dom.name) or {}
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
            return JobStats(
                type="unbounded",
                operation="outgoing migration",
                phase=dom.job.phase.name.lower() if dom.job.phase is not None else "none",
                stats=stats,
            )

    async def job_abort(self, dom: QemuDomain) -> None:
        if dom.job.async_job == AsyncJob.MIGRATION_IN:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                "cannot abort incoming migration; use destroy instead",
            )
        async with dom.job.acquire(Job.ABORT, "domjobabort"):
            if dom.job.async_job == AsyncJob.NONE:
                raise VmferryError(ErrorCode.OPERATION_INVALID, "no job is active on the domain")
            dom.job.request_abort()
            dom.notify()
            if dom.monitor is not None and dom.migration.status not in ("none", "completed"):
                await dom.monitor.execute("migrate_cancel")

    async def set_max_downtime(self, dom: QemuDomain, downtime_ms: int) -> None:
        if downtime_ms <= 0:
            raise VmferryError(ErrorCode.INVALID_ARG, "downtime must be a positive number of ms")
        async with dom.job.acquire(Job.MIGRATION_OP, "migrate-setmaxdowntime"):
            await dom.require_monitor().execute(
                "migrate-set-parameters", {"downtime-limit": downtime_ms}
            )

    async def get_max_downtime(self, dom: QemuDomain) -> int:
        async with dom.job.acquire(Job.QUERY, "migrate-getmaxdowntime"):
            params = await dom.require_monitor().execute("query-migrate-parameters")
            return int(params.get("downtime-limit", 300))

    async def set_speed(self, dom: QemuDomain, bandwidth_mib_s: int) -> None:
        if bandwidth_mib_s < 0:
            raise VmferryError(ErrorCode.INVALID_ARG, "bandwidth must not be negative")
        value = bandwidth_mib_s * MIB if bandwidth_mib_s else UNLIMITED_BANDWIDTH
        async with dom.job.acquire(Job.MIGRATION_OP, "migrate-setspeed"):
            await dom.require_monitor().execute("migrate-set-parameters", {"max-bandwidth": value})

    async def get_speed(self, dom: QemuDomain) -> int:
        async with dom.job.acquire(Job.QUERY, "migrate-getspeed"):
            params = await dom.require_monitor().execute("query-migrate-parameters")
            value = int(params.get("max-bandwidth", 0))
            return 0 if value >= UNLIMITED_BANDWIDTH else value // MIB

    # -- close callbacks ----------------------------------------------------------------------

    async def session_lost(self, dom: QemuDomain) -> None:
        job = dom.job
        if job.owned:
            return
        if job.async_job == AsyncJob.MIGRATION_IN:
            await destination.destroy_incoming(self, dom)
        elif job.async_job == AsyncJob.MIGRATION_OUT:
            if job.phase == MigrationPhase.BEGIN3:
                log.warning("client left after Begin of %s: dropping the job", dom.name)
                job.finish_async()
            elif job.phase == MigrationPhase.PERFORM3_DONE:
                # Finish's outcome is unknown: leave the guest paused (libvirt does the same).
                log.warning("client left after Perform of %s: guest stays paused", dom.name)
                job.set_phase(MigrationPhase.CONFIRM3_CANCELLED)
                job.finish_async()
                if dom.state == DomainState.PAUSED:
                    dom.set_state(DomainState.PAUSED, PausedReason.MIGRATION_UNRESOLVED)
