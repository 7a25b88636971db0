"""The daemon's domain driver: every lifecycle API, under the job rules.

libvirt's ``qemu_driver.c``: looks a domain up, takes the job an API needs,
persists, then acts through :class:`~vmferry.qemu.lifecycle.Lifecycle`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

import defusedxml.ElementTree as SafeET

from vmferry import __version__, failpoints
from vmferry.api.models import (
    ClusterInfo,
    ClusterVm,
    ConsoleOutput,
    DomainInfo,
    Event,
    HostInfo,
    JobInfo,
)
from vmferry.daemon.autostart import Autostart
from vmferry.daemon.cluster import ClusterView
from vmferry.daemon.config import DaemonConfig
from vmferry.daemon.events import EventBus
from vmferry.daemon.host import HostIdentity
from vmferry.daemon.lease import LeaseBackend, NoLeases
from vmferry.daemon.maintenance import Maintenance
from vmferry.daemon.sessions import Sessions
from vmferry.daemon.state import StateDir, atomic_write
from vmferry.domain.model import DomainDef
from vmferry.domain.state import (
    DomainState,
    ErrorReason,
    EventType,
    PausedReason,
    ShutoffReason,
)
from vmferry.domain.xml import format_domain_xml, parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob, DomainJob, Job
from vmferry.migration.peer_probe import MigrationPeer
from vmferry.migration.phase import MigrationPhase
from vmferry.migration.restart import bookkeeping, restore_bookkeeping
from vmferry.qemu.command import BlockLayer
from vmferry.qemu.confine import Confinement
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.lifecycle import Lifecycle, RunPaths
from vmferry.storage import Pools

log = logging.getLogger(__name__)

#: What this daemon can do (``GET /v1/host`` and a session's first line tell clients).
FEATURES = ("migration-v2", "migration-v3", "migration-p2p", "migration-offline")

_CONSOLE_CHUNK = 1 << 20
# SIGTERM lets QEMU flush disks; SIGKILL follows if it takes longer (libvirt waits 10 s).
DESTROY_GRACE_S = 5.0
#: The name a running QEMU keeps its domain's lease lock under (QMP getfd).
LEASE_FD_NAME = "vmferry-lease"


def _well_formed(text: str) -> bool:
    """Whether *text* parses as XML at all (a corrupt file does not; a refused one may)."""
    try:
        SafeET.fromstring(text)
    except Exception:  # any parse failure means "not XML"
        return False
    return True


class JobHooks(Protocol):
    """What the driver hands to the migration service (set with :meth:`Driver.set_job_hooks`)."""

    async def session_lost(self, dom: QemuDomain) -> None:
        """The client session bound to *dom*'s job closed (libvirt's close callback)."""
        ...

    async def recover_job(self, dom: QemuDomain, job: dict[str, Any]) -> None:
        """Resolve *dom*'s async job a restart interrupted (QEMU re-attached or gone)."""
        ...


class Driver:
    """All domains of this host and the APIs that act on them."""

    def __init__(
        self,
        state: StateDir,
        config: DaemonConfig,
        host: HostIdentity,
        *,
        confine: Confinement | None = None,
        pools: Pools | None = None,
    ) -> None:
        self.state = state
        #: Storage pools (None: volume disks cannot start, file disks' backing is QEMU's).
        self.pools = pools
        self.config = config
        self.host = host
        self.events = EventBus()
        self.autostart = Autostart(state)
        self._domains: dict[str, QemuDomain] = {}  # by uuid
        self.lifecycle = Lifecycle(
            paths_for=self._paths_for,
            emulator=config.qemu.emulator,
            emit=self._emit,
            on_stopped=self._on_stopped,
            confine=confine,
            sandbox=config.qemu.sandbox,
            trace_events=config.qemu.trace_events,
            resolve_disks=self._resolve_disks if pools is not None else None,
        )
        self.qemu_version = ""
        self.sessions = Sessions(self._session_closed, features=FEATURES)
        self._ports_in_use: set[int] = set()
        self._written: dict[Path, str] = {}  # status file -> what is on disk
        self._xml_cache: dict[str, tuple[DomainDef, str]] = {}
        # completed-job statistics of domains that left this host (domjobinfo --completed)
        self.last_completed: dict[str, dict[str, Any]] = {}
        # where each outgoing migration went, by domain uuid (persisted: recovery asks there)
        self.migration_peers: dict[str, MigrationPeer] = {}
        #: (job, seconds) after each wait for a domain's job: the metrics of the daemon's app.
        self.on_job_wait: Callable[[str, float], None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._job_hooks: JobHooks | None = None  # the migration service, once composed
        # The cluster this host is in (vmferry.daemon.cluster, .lease); set by vmferryd.
        self.leases: LeaseBackend = NoLeases()
        self.membership: ClusterView | None = None
        self.lifecycle.inherit_fds = lambda dom: self.leases.inheritable(dom.uuid)
        self.maintenance = Maintenance(state.root, host.hostname)

    async def _resolve_disks(self, d: DomainDef) -> dict[str, list[BlockLayer]]:
        assert self.pools is not None
        return await asyncio.to_thread(self.pools.resolve, d)

    def set_job_hooks(self, hooks: JobHooks) -> None:
        """Let *hooks* handle lost sessions and interrupted jobs (else jobs are dropped)."""
        self._job_hooks = hooks

    # -- what the migration layer needs (vmferry.migration.host.MigrationHost) ---------------

    @property
    def host_uuid(self) -> str:
        return self.host.uuid

    @property
    def hostname(self) -> str:
        return self.host.hostname

    def unpersist_definition(self, dom: QemuDomain) -> None:
        self.state.remove(self.state.definition_path(dom.name))
        self.autostart.set(dom.name, False)  # libvirt drops the autostart link with it
        dom.persistent = None
        dom.save()

    def acquire_port(self) -> int:
        cfg = self.config.migration
        for port in range(cfg.port_min, cfg.port_max + 1):
            if port in self._ports_in_use:
                continue
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("", port))
                except OSError:
                    continue
            self._ports_in_use.add(port)
            return port
        raise VmferryError(
            ErrorCode.NO_FREE_PORT,
            f"no free migration port in {cfg.port_min}-{cfg.port_max} "
            "(set [migration] port_min/port_max)",
        )

    def release_port(self, port: int) -> None:
        self._ports_in_use.discard(port)

    def bind_session(self, session: str, dom: QemuDomain) -> None:
        if not self.sessions.is_open(session):
            raise VmferryError(ErrorCode.OPERATION_INVALID, f"client session {session} is not open")
        self.sessions.bind(session, dom.uuid)
        dom.bound_session = session  # not persisted: sessions die with the daemon

    def unbind_session(self, dom: QemuDomain) -> None:
        if dom.bound_session:
            self.sessions.unbind(dom.bound_session, dom.uuid)
            dom.bound_session = ""

    async def _session_closed(self, session: str, bound: set[str]) -> None:
        """libvirt's close callbacks: a client left in the middle of a migration."""
        for uuid in bound:
            dom = self._domains.get(uuid)
            if dom is None or dom.bound_session != session:
                continue
            dom.bound_session = ""
            if self._job_hooks is None:
                continue
            try:
                await self._job_hooks.session_lost(dom)
            except Exception:
                log.exception("cleaning up after the client of %s left", dom.name)

    # -- registry ----------------------------------------------------------------------------

    def _paths_for(self, name: str) -> RunPaths:
        return RunPaths(
            qmp_socket=self.state.qmp_socket(name),
            console_log=self.state.console_log(name),
            qemu_log=self.state.qemu_log(name),
        )

    def domains(self) -> Iterator[QemuDomain]:
        return iter(sorted(self._domains.values(), key=lambda d: d.name))

    def lookup(self, key: str) -> QemuDomain:
        """Find a domain by name or UUID."""
        dom = self._domains.get(key.lower())
        if dom is None:
            dom = next((d for d in self._domains.values() if d.name == key), None)
        if dom is None:
            raise VmferryError(
                ErrorCode.NO_DOMAIN, f"Domain not found: no domain with matching name '{key}'"
            )
        return dom

    def find(self, name: str, uuid: str) -> QemuDomain | None:
        """The domain clashing with *name* or *uuid*, if any."""
        return self._domains.get(uuid) or next(
            (d for d in self._domains.values() if d.name == name), None
        )

    def add(self, definition: DomainDef, persistent: DomainDef | None) -> QemuDomain:
        """Register a new domain object; the caller has checked for clashes."""
        dom = QemuDomain(
            definition=definition,
            persistent=persistent,
            job=DomainJob(definition.name, wait_timeout=self.config.jobs.wait_timeout),
            save_status=self._save_status,
        )
        dom.job.on_change = dom.save
        dom.job.on_wait = self._job_waited
        self._domains[definition.uuid] = dom
        self.last_completed.pop(definition.name, None)
        return dom

    def _job_waited(self, job: str, seconds: float) -> None:
        if self.on_job_wait is not None:
            self.on_job_wait(job, seconds)

    def remove(self, dom: QemuDomain) -> None:
        if dom.completed_job:
            self.last_completed[dom.name] = dom.completed_job
        self._domains.pop(dom.uuid, None)
        self.migration_peers.pop(dom.uuid, None)

    def check_clash(self, definition: DomainDef, *, allow_inactive_same: bool) -> QemuDomain | None:
        """virDomainObjListAdd's rules: one name, one uuid, no clash with a running domain."""
        other = self.find(definition.name, definition.uuid)
        if other is None:
            return None
        if other.uuid != definition.uuid:
            raise VmferryError(
                ErrorCode.DOMAIN_EXISTS,
                f"domain '{definition.name}' already exists with uuid {other.uuid}",
            )
        if other.name != definition.name:
            raise VmferryError(
                ErrorCode.DOMAIN_EXISTS,
                f"domain '{other.name}' is already defined with uuid {other.uuid}",
            )
        if other.active and not allow_inactive_same:
            raise VmferryError(ErrorCode.DOMAIN_EXISTS, f"domain '{other.name}' is already active")
        return other

    # -- persistence --------------------------------------------------------------------------

    def _save_status(self, dom: QemuDomain) -> None:
        path = self.state.status_path(dom.name)
        if not dom.active and dom.job.async_job == "none":
            self._written.pop(path, None)
            self.state.remove(path)
            return
        data = json.dumps(self.status_of(dom), sort_keys=True)
        if self._written.get(path) == data:
            return  # many saves change nothing on disk (an event re-stating the state)
        # Status files describe processes that die with the host, like libvirt's files in
        # /run: the rename keeps them whole across a daemon crash; an fsync would only
        # protect against a power loss that takes the QEMUs with it, at ~3 ms a write.
        try:
            failpoints.fail_io("status-write")
            atomic_write(path, data, durable=False)
        except OSError as exc:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot write the status of domain '{dom.name}' to {path}: {exc.strerror or exc}",
            ) from exc
        self._written[path] = data

    def status_of(self, dom: QemuDomain) -> dict[str, Any]:
        peer = self.migration_peers.get(dom.uuid)
        return {
            "name": dom.name,
            "uuid": dom.uuid,
            "state": str(dom.state),
            "reason": dom.reason,
            "pid": dom.process.pid if dom.process is not None else None,
            "run_id": dom.run_id,
            "persistent": dom.persistent is not None,
            "job": dom.job.to_status(),
            "migration": bookkeeping(dom),
            "peer": peer.to_dict() if peer is not None else None,
            "fake_reboot": dom.fake_reboot,
            "xml": self._live_xml(dom.definition),
        }

    def _live_xml(self, definition: DomainDef) -> str:
        # Formatting is the costliest part of a status write; definitions rarely change.
        cached = self._xml_cache.get(definition.uuid)
        if cached is None or cached[0] is not definition:
            cached = self._xml_cache[definition.uuid] = (definition, format_domain_xml(definition))
        return cached[1]

    def persist_definition(self, definition: DomainDef) -> None:
        path = self.state.definition_path(definition.name)
        try:
            failpoints.fail_io("definition-write")
            atomic_write(path, format_domain_xml(definition))
        except OSError as exc:  # e.g. a full disk: nothing was changed, say so plainly
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot write the definition of domain '{definition.name}' to {path}: "
                f"{exc.strerror or exc}",
            ) from exc

    def _on_stopped(self, dom: QemuDomain) -> None:
        self.leases.release(dom.uuid)  # its QEMU is gone: another host may start it now
        path = self.state.status_path(dom.name)
        self._written.pop(path, None)
        self.state.remove(path)
        if dom.persistent is None:
            self.remove(dom)
        else:
            dom.definition = dom.persistent
            # it runs elsewhere now: no autostart here until it is started here again
            self.autostart.note(dom.name, migrated=dom.reason == ShutoffReason.MIGRATED)

    def _emit(self, dom: QemuDomain, kind: EventType, reason: str, detail: dict[str, Any]) -> None:
        self.events.publish(
            Event(
                type=str(kind),
                domain=dom.name,
                uuid=dom.uuid,
                reason=reason,
                timestamp=time.time(),
                detail=detail,
            )
        )

    # -- start-up ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Load definitions, then re-attach to every QEMU left running by an earlier daemon.

        A corrupt or unreadable file never stops the daemon: it is moved aside
        (``NAME.json.corrupt-<time>``), logged, and the domain is reported with
        reason ``status-corrupt``; every other domain is loaded normally.
        """
        failpoints.load_from_env()  # a typo in a failpoint must stop the daemon here
        self.state.ensure()
        self.autostart.load()
        for name in self.state.list_definitions():
            self._load_definition(name)
        for name in self.state.list_statuses():
            try:
                await self._reconnect(name)
            except Exception:
                log.exception("domain %s: cannot re-attach to its QEMU; leaving it alone", name)
        for dom in list(self._domains.values()):
            await self._retake_lease(dom)
        if self.membership is not None:
            self.membership.start()

    def _lease_wanted(self, dom: QemuDomain) -> bool:
        """Whether *dom* should hold its lease here (running or paused, not arriving)."""
        if not dom.active or dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
            return False
        return dom.job.async_job != AsyncJob.MIGRATION_IN

    async def _retake_lease(self, dom: QemuDomain) -> None:
        """A restarted daemon takes the leases of its guests again (they died with the old one).

        A guest whose lease another host took meanwhile must not run here: it is paused.
        """
        if not self._lease_wanted(dom) or dom.job.async_job != AsyncJob.NONE:
            return  # a migration's recovery decides who holds it (migration.restart)
        try:
            await self.take_lease(dom)
        except VmferryError as err:
            log.error("domain %s: %s; pausing it here", dom.name, err.message)
            await self.pause_lease_lost(dom)

    async def take_lease(self, dom: QemuDomain, *, previous: str = "") -> None:
        """Take *dom*'s lease and share it with its running QEMU, so it outlives this daemon."""
        await self.leases.acquire(dom.uuid, dom.name, previous=previous)
        for fd in self.leases.inheritable(dom.uuid):
            try:
                mon = dom.monitor
                if mon is not None and mon.connected:
                    await mon.pass_fd(fd, LEASE_FD_NAME)
            except VmferryError as err:
                log.warning("domain %s: its QEMU does not keep the lease lock: %s", dom.name, err)
            finally:
                os.close(fd)

    async def pause_lease_lost(self, dom: QemuDomain) -> None:
        """Pause *dom* (reason ``lease-lost``): this host no longer holds its lease."""
        mon = dom.monitor
        if mon is None or not mon.connected:
            return
        if dom.state == DomainState.PAUSED:
            dom.reason = str(PausedReason.LEASE_LOST)
            dom.save()
            return
        dom.pending_pause_reason = str(PausedReason.LEASE_LOST)
        try:
            await mon.execute("stop")
            await dom.wait_for(lambda: dom.state == DomainState.PAUSED, 5.0)
        except VmferryError as err:
            log.error("domain %s: cannot pause it after losing its lease: %s", dom.name, err)

    def _load_definition(self, name: str) -> None:
        path = self.state.definition_path(name)
        text: str | None = None
        try:
            text = self.state.read_state_text(path)
            if text is None:
                return
            definition = parse_domain_xml(text)
        except VmferryError as err:
            if text is None or not _well_formed(text):
                aside = self.state.move_aside(path)
                log.error(
                    "definition of domain %s is corrupt (%s); moved to %s",
                    name,
                    err.message,
                    aside or "nowhere (rename failed)",
                )
            else:  # well-formed but refused (e.g. by a changed policy): the admin fixes it
                log.error("skipping definition %s: %s", name, err.message)
            return
        self.add(definition, definition)

    async def _corrupt_status(self, name: str, err: VmferryError) -> None:
        """run/NAME.json cannot be used: keep it aside and report the domain.

        A persistent domain whose QEMU still runs is re-attached through its
        definition (the pid is found by its QMP socket); a transient one has
        no definition left, so its QEMU is left alone and logged.
        """
        path = self.state.status_path(name)
        aside = self.state.move_aside(path)
        self._written.pop(path, None)
        alive = self.lifecycle.qemu_pids(self.state.qmp_socket(name))
        dom = self.find(name, "")
        log.error(
            "status of domain %s is corrupt (%s); moved to %s",
            name,
            err.message,
            aside or "nowhere (rename failed)",
        )
        if dom is None or dom.active:
            if alive:
                log.error(
                    "domain %s: its QEMU (pid %s) has no usable definition; it is left running "
                    "unmanaged: stop it by hand",
                    name,
                    ", ".join(map(str, alive)),
                )
            return
        if alive:
            dom.state, dom.reason = DomainState.PAUSED, "unknown"
            await self.lifecycle.reconnect(dom, alive[0])
            if dom.monitor is None:
                return  # gone (crashed) or unmanaged (monitor-lost): that reason says more
            log.warning("domain %s: re-attached to QEMU pid %d", name, alive[0])
        dom.reason = str(ErrorReason.STATUS_CORRUPT)
        dom.save()

    async def _reconnect(self, name: str) -> None:
        path = self.state.status_path(name)
        try:
            status = self.state.read_json(path)
            if status is None:
                return
            if not isinstance(status, dict):
                raise VmferryError(ErrorCode.INTERNAL_ERROR, "not a JSON object")
            live = parse_domain_xml(str(status["xml"]))
            state = DomainState(status["state"])
            pid = status.get("pid")
            pid = int(pid) if pid is not None else None
            run_id = status.get("run_id")
            if run_id is not None and not isinstance(run_id, int):
                raise VmferryError(ErrorCode.INTERNAL_ERROR, "run_id is not an integer")
        except (VmferryError, KeyError, ValueError, TypeError) as exc:
            err = (
                exc
                if isinstance(exc, VmferryError)
                else VmferryError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            )
            await self._corrupt_status(name, err)
            return
        dom = self.find(live.name, live.uuid)
        if dom is None:
            dom = self.add(live, None)
        else:
            dom.definition = live
        dom.state = state
        dom.reason = str(status.get("reason", "unknown"))
        dom.run_id = run_id
        dom.fake_reboot = status.get("fake_reboot") is True  # a reboot asked before the restart
        # Back in memory before anything saves the status again: a second crash during
        # recovery must find the same job, bookkeeping and peer.
        try:
            restore_bookkeeping(dom, status.get("migration"))
        except (ValueError, TypeError) as exc:
            log.error("domain %s: dropping corrupt migration bookkeeping: %s", name, exc)
        peer = MigrationPeer.from_dict(status.get("peer"))
        if peer is not None:
            self.migration_peers[dom.uuid] = peer
        job = status.get("job") or {}
        if not isinstance(job, dict):
            log.error("domain %s: dropping a job that is not a JSON object", name)
            job = {}
        try:
            dom.job.restore(job, MigrationPhase)
        except VmferryError as err:
            log.error("domain %s: dropping a job that cannot be restored: %s", name, err.message)
        await self.lifecycle.reconnect(dom, pid)
        if dom.job.async_job != "none":
            if (dom.monitor is None and dom.active) or self._job_hooks is None:
                await self._drop_job(dom, job)  # nothing to recover through
            else:
                await self._job_hooks.recover_job(dom, job)

    async def _drop_job(self, dom: QemuDomain, job: dict[str, Any]) -> None:
        """End an async job interrupted by the restart that nothing can resolve."""
        log.warning("dropping interrupted job %s of domain %s", job, dom.name)
        dom.job.finish_async()
        dom.save()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run *coro* in the background until it ends or the daemon stops."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Let go of every QEMU without stopping it: guests outlive the daemon."""
        if self.membership is not None:
            await self.membership.close()
        for task in list(self._background):
            task.cancel()  # a resolver's job stays persisted for the next daemon
        if self._background:
            await asyncio.wait(list(self._background))
        for dom in list(self._domains.values()):
            if dom.monitor is not None:
                dom.stopping = True
                await dom.monitor.close()
            if dom.process is not None:
                dom.process.close()
        await self.lifecycle.close()
        await self.leases.close()

    # -- queries -----------------------------------------------------------------------------

    def host_info(self) -> HostInfo:
        return HostInfo(
            hostname=self.host.hostname,
            uuid=self.host.uuid,
            version=__version__,
            qemu_version=self.qemu_version,
            features=list(FEATURES),
        )

    def cluster_vms(self) -> list[ClusterVm]:
        """The domains that hold (or should hold) their lease here."""
        return [
            ClusterVm(name=d.name, uuid=d.uuid, state=str(d.state))
            for d in self.domains()
            if self._lease_wanted(d)
        ]

    async def cluster_info(self) -> ClusterInfo:
        if self.membership is None:
            return ClusterInfo(backend=self.leases.kind)
        return await self.membership.snapshot()

    # -- fencing (etcd): this host lost its session, then got a new one ------------------------

    async def fence(self) -> None:
        """Pause every guest holding a lease here (``lease-lost``): another host may take them."""
        for dom in list(self._domains.values()):
            if self.leases.holds(dom.uuid):
                forget = getattr(self.leases, "forget", None)
                if forget is not None:
                    forget(dom.uuid)
                await self.pause_lease_lost(dom)

    async def unfence(self) -> None:
        """Back in the cluster: resume a fenced guest whose lease is still free, stop the others."""
        for dom in list(self._domains.values()):
            if not dom.active or dom.reason != PausedReason.LEASE_LOST:
                continue
            try:
                await self.leases.acquire(dom.uuid, dom.name)
            except VmferryError as err:
                if err.code != ErrorCode.LEASE_HELD:
                    log.error("domain %s: %s; leaving it paused", dom.name, err.message)
                    continue
                log.error("domain %s: %s; stopping the copy here", dom.name, err.message)
                async with dom.job.acquire(Job.DESTROY, "lease-lost"):
                    await self.lifecycle.stop(dom, ShutoffReason.LEASE_LOST, grace=DESTROY_GRACE_S)
                continue
            mon = dom.monitor
            if mon is not None and mon.connected:
                dom.pending_resume_reason = "unpaused"
                await mon.execute("cont")

    def info(self, dom: QemuDomain) -> DomainInfo:
        d = dom.definition
        return DomainInfo(
            name=d.name,
            uuid=d.uuid,
            id=dom.run_id,
            state=str(dom.state),
            reason=dom.reason,
            persistent=dom.persistent is not None,
            title=d.title or "",
            max_memory_kib=d.memory_kib,
            memory_kib=d.current_memory_kib,
            vcpus=d.vcpus,
            domain_type=d.type,
            autostart=self.autostart.enabled(d.name),
            job=JobInfo(**dom.job.info()),
        )

    def dumpxml(self, dom: QemuDomain, *, migratable: bool, inactive: bool) -> str:
        definition = dom.persistent if inactive and dom.persistent is not None else dom.definition
        return format_domain_xml(definition, migratable=migratable)

    def console(self, dom: QemuDomain, offset: int) -> ConsoleOutput:
        path = self.state.console_log(dom.name)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = min(max(offset, 0), size)
                f.seek(start)
                data = f.read(_CONSOLE_CHUNK)
        except FileNotFoundError:
            return ConsoleOutput(offset=0, next_offset=0, data="")
        return ConsoleOutput(
            offset=start, next_offset=start + len(data), data=data.decode("utf-8", "replace")
        )

    # -- lifecycle APIs -----------------------------------------------------------------------

    def check_definition(self, definition: DomainDef) -> None:
        """Refuse a definition whose QEMU would reach what it may not (see qemu.confine)."""
        if self.lifecycle.confine is not None:
            self.lifecycle.confine.check(definition)

    async def define(self, xml: str) -> QemuDomain:
        definition = parse_domain_xml(xml)
        self.check_definition(definition)
        existing = self.check_clash(definition, allow_inactive_same=True)
        if existing is None:
            self.persist_definition(definition)
            dom = self.add(definition, definition)
        else:
            dom = existing
            async with dom.job.acquire(Job.MODIFY, "define"):
                self.persist_definition(definition)
                dom.persistent = definition
                if not dom.active:
                    dom.definition = definition
        self._emit(dom, EventType.DEFINED, "added" if existing is None else "updated", {})
        return dom

    async def undefine(self, dom: QemuDomain) -> QemuDomain:
        async with dom.job.acquire(Job.MODIFY, "undefine"):
            if dom.persistent is None:
                raise VmferryError(
                    ErrorCode.OPERATION_INVALID, f"cannot undefine transient domain '{dom.name}'"
                )
            self.state.remove(self.state.definition_path(dom.name))
            self.autostart.set(dom.name, False)
            dom.persistent = None
            if not dom.active and dom.job.async_job == "none":
                self.remove(dom)
            else:
                dom.save()
        self._emit(dom, EventType.UNDEFINED, "removed", {})
        return dom

    async def create(self, xml: str) -> QemuDomain:
        """Start a domain from *xml*; a refused or failed create leaves everything as it was."""
        definition = parse_domain_xml(xml)
        self.check_definition(definition)
        # An active domain with this name and uuid is a clash: its definition must not change.
        existing = self.check_clash(definition, allow_inactive_same=False)
        dom = existing if existing is not None else self.add(definition, None)
        try:
            async with dom.job.acquire(Job.MODIFY, "create"):
                if dom.active:  # started by another call while this one waited for the job
                    raise VmferryError(
                        ErrorCode.DOMAIN_EXISTS, f"domain '{dom.name}' is already active"
                    )
                dom.definition = definition
                try:
                    await self._start_leased(dom)
                except BaseException:
                    if not dom.active and dom.persistent is not None:
                        dom.definition = dom.persistent
                    raise
        except BaseException:
            if existing is None and not dom.active and dom.job.async_job == "none":
                self.remove(dom)  # a transient domain that never ran
            raise
        return dom

    async def start(self, dom: QemuDomain) -> QemuDomain:
        async with dom.job.acquire(Job.MODIFY, "start"):
            await self._start_leased(dom)
        self.autostart.note(dom.name, migrated=False)
        return dom

    async def _start_leased(self, dom: QemuDomain) -> None:
        """Take the domain's lease, then start it; a failed start gives the lease back."""
        self.maintenance.check("new domain")
        await self.leases.acquire(dom.uuid, dom.name)
        try:
            await self.lifecycle.start(dom)
        except BaseException:
            if not dom.active:
                self.leases.release(dom.uuid)
            raise

    async def shutdown(self, dom: QemuDomain, timeout: float) -> QemuDomain:
        async with dom.job.acquire(Job.MODIFY, "shutdown"):
            mon = dom.require_monitor()
            dom.fake_reboot = False  # a shutdown after a reboot request means off (libvirt)
            await mon.execute("system_powerdown")
        if not await dom.wait_for(lambda: not dom.active, timeout):
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"domain '{dom.name}' did not shut down within {timeout:g} s; "
                "the guest may ignore ACPI power button events (use destroy)",
            )
        return dom

    async def destroy(self, dom: QemuDomain) -> QemuDomain:
        async with dom.job.acquire(Job.DESTROY, "destroy"):
            dom.require_active()
            await self.lifecycle.stop(dom, ShutoffReason.DESTROYED, grace=DESTROY_GRACE_S)
        return dom

    async def suspend(self, dom: QemuDomain) -> QemuDomain:
        async with dom.job.acquire(Job.SUSPEND, "suspend"):
            mon = dom.require_monitor()
            if dom.state == DomainState.PAUSED:
                return dom
            dom.pending_pause_reason = "user"
            await mon.execute("stop")
            await dom.wait_for(lambda: dom.state == DomainState.PAUSED, 5.0)
        return dom

    async def resume(self, dom: QemuDomain) -> QemuDomain:
        async with dom.job.acquire(Job.MODIFY, "resume"):
            mon = dom.require_monitor()
            if dom.state == DomainState.RUNNING:
                return dom
            if dom.job.async_job != AsyncJob.MIGRATION_IN:
                # Paused after losing its lease (or a failed hand-over): only with it back.
                await self.take_lease(dom)
            dom.pending_resume_reason = "unpaused"
            await mon.execute("cont")
            await dom.wait_for(lambda: dom.state == DomainState.RUNNING, 5.0)
        return dom
