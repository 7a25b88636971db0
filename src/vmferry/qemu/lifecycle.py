"""Starting, stopping, reconnecting to and watching a domain's QEMU.

libvirt's ``qemu_process.c``: the only place that creates or kills a QEMU
process, and the place where QEMU's events become domain states.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry import trace
from vmferry.domain.model import DomainDef
from vmferry.domain.state import (
    DomainState,
    ErrorReason,
    EventType,
    PausedReason,
    RunningReason,
    ShutoffReason,
)
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob
from vmferry.qemu import blockjob
from vmferry.qemu.command import BlockLayer, QemuPaths, build_argv, cache_direct, qmp_marker
from vmferry.qemu.confine import Confinement, DiskFile
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.launch import launch, reattach
from vmferry.qemu.migration_status import MigrationStatus
from vmferry.qemu.monitor import QmpCommand
from vmferry.qemu.process import QemuProcess

log = logging.getLogger(__name__)

Emit = Callable[[QemuDomain, EventType, str, dict[str, Any]], None]
#: A domain's disks -> target dev -> its images, top first.
ResolveDisks = Callable[[DomainDef], Awaitable[Mapping[str, Sequence[BlockLayer]]]]


def volume_files(d: DomainDef, chains: Mapping[str, Sequence[BlockLayer]]) -> list[DiskFile]:
    """The images of *d*'s volume disks, as QEMU opens them (see :class:`DiskFile`)."""
    files = []
    for disk in d.devices.disks:
        if disk.type != "volume":
            continue
        for level, layer in enumerate(chains.get(disk.target_dev, ())):
            write = level == 0 and not disk.readonly and disk.device == "disk"
            files.append(DiskFile(layer.path, write=write, direct=cache_direct(disk)))
    return files


@dataclass(frozen=True)
class RunPaths:
    """Where one domain's QEMU keeps its sockets and logs on this host."""

    qmp_socket: Path
    console_log: Path
    qemu_log: Path


class Lifecycle:
    """Starts and stops QEMU for domains and keeps their state in step with QEMU's events.

    :param paths_for: run paths of a domain, by name.
    :param emulator: QEMU binary used when the definition names none.
    :param emit: publishes a lifecycle event.
    :param on_stopped: called once a domain's QEMU is gone and its state is shut off
        (the daemon drops the status file and forgets transient domains there).
    :param confine: what QEMU may reach (checked at every start); QEMU gets the
        descriptors it opens. None: no checks, QEMU opens its paths itself.
    :param sandbox: start QEMU with its seccomp filter.
    :param trace_events: QEMU trace events to turn on (``[qemu] trace_events``).
    :param resolve_disks: the images of each disk, top first, by target dev
        (``vmferry.storage``); volumes are passed to QEMU as descriptors.
        None: only file disks, QEMU opens their backing files itself.
    """

    def __init__(
        self,
        *,
        paths_for: Callable[[str], RunPaths],
        emulator: str,
        emit: Emit,
        on_stopped: Callable[[QemuDomain], None],
        confine: Confinement | None = None,
        sandbox: bool = False,
        trace_events: Sequence[str] = (),
        resolve_disks: ResolveDisks | None = None,
    ) -> None:
        self.confine = confine
        self._resolve_disks = resolve_disks
        self._sandbox = sandbox
        self._trace_events = tuple(trace_events)
        self._paths_for = paths_for
        self._emulator = emulator
        self._emit = emit
        self._on_stopped = on_stopped
        #: Descriptors a new QEMU of a domain keeps open (its lease's lock); set by the daemon.
        self.inherit_fds: Callable[[QemuDomain], list[int]] | None = None
        self._next_id = 1
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(self, dom: QemuDomain, kind: EventType, reason: str, detail: dict[str, Any]) -> None:
        self._emit(dom, kind, reason, detail)

    def reserve_ids(self, used: int) -> None:
        self._next_id = max(self._next_id, used + 1)

    def paths(self, dom: QemuDomain) -> RunPaths:
        return self._paths_for(dom.name)

    # -- start -----------------------------------------------------------------------------

    async def start(
        self,
        dom: QemuDomain,
        *,
        incoming: bool = False,
        paused: bool = False,
        setup: Sequence[QmpCommand] = (),
    ) -> None:
        """Launch QEMU for *dom*; run the guest unless *incoming* or *paused*.

        An incoming domain waits with ``-incoming defer`` for ``migrate-incoming``.
        *setup*: QMP commands for the caller (an incoming migration's parameters,
        ``migrate-incoming``, its NBD server), pipelined with the start's own: one
        round trip for all; any failing stops QEMU as a failed start does.
        """
        if dom.active:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID, f"domain '{dom.name}' is already running"
            )
        paths = self.paths(dom)
        qemu_paths = QemuPaths(qmp_socket=paths.qmp_socket, console_log=paths.console_log)
        emulator = dom.definition.devices.emulator or self._emulator
        # Refuse what cannot or may not run before anything changes.
        if self.confine is not None:
            self.confine.check(dom.definition)
        chains = None
        if self._resolve_disks is not None:
            with trace.span("resolve disks"):
                chains = await self._resolve_disks(dom.definition)
        build_argv(dom.definition, qemu_paths, chains=chains)
        if self.confine is None:
            for stale in (paths.qmp_socket, paths.console_log):
                stale.unlink(missing_ok=True)
        dom.run_id = self._next_id
        self._next_id += 1
        dom.stopping = False
        passed = None
        try:
            # Persisted before the process exists, so a restart can find a QEMU we lost track
            # of; if that write fails (disk full), no QEMU is started and no half-made domain
            # stays "paused/starting-up".
            dom.set_state(DomainState.PAUSED, PausedReason.STARTING_UP)
            if self.confine is not None:
                paths.console_log.unlink(missing_ok=True)
                with trace.span("open files"):
                    passed = self.confine.open_files(
                        dom.definition,
                        qmp_socket=paths.qmp_socket,
                        console_log=paths.console_log,
                        disks=volume_files(dom.definition, chains or {}),
                    )
                if self.inherit_fds is not None:
                    passed.inherit.extend(self.inherit_fds(dom))
            argv = build_argv(
                dom.definition,
                qemu_paths,
                incoming=incoming,
                emulator=emulator,
                passed=passed,
                sandbox=self._sandbox,
                chains=chains,
                trace_events=self._trace_events,
            )
            with trace.span("qemu launch"):
                proc, mon = await launch(
                    argv,
                    qmp_socket=paths.qmp_socket,
                    log_path=paths.qemu_log,
                    name=dom.name,
                    user=self.confine.user if self.confine is not None else None,
                    passed=passed,
                )
        except BaseException:
            if passed is not None:
                passed.close()
            self._forget(dom, ShutoffReason.FAILED)
            raise
        dom.process, dom.monitor = proc, mon
        self._watch(dom)
        try:
            if incoming:
                # Its state rides in the pid's write (one write, not two): for a restart,
                # an incoming QEMU is its migration job's to keep or kill either way.
                dom.state, dom.reason = DomainState.PAUSED, str(PausedReason.MIGRATION)
            dom.save()
            # MIGRATION events are what every migration wait is driven by.
            commands: list[QmpCommand] = [
                (
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
            ]
            d = dom.definition
            ballooned = d.devices.memballoon == "virtio" and d.current_memory_kib < d.memory_kib
            if ballooned and not incoming:
                # <currentMemory> below <memory>: the balloon's target (libvirt's
                # qemuProcessSetupBalloon); an incoming guest's comes with the stream.
                commands.append(("balloon", {"value": d.current_memory_kib * 1024}))
            await mon.execute_all([*commands, *setup])
            if incoming:
                dom.notify()
                self._emit(dom, EventType.STARTED, "migrated", {})
            elif paused:
                dom.set_state(DomainState.PAUSED, PausedReason.USER)
                self._emit(dom, EventType.STARTED, "booted", {})
            else:
                dom.pending_resume_reason = RunningReason.BOOTED
                await mon.execute("cont")
                dom.set_state(DomainState.RUNNING, RunningReason.BOOTED)
                self._emit(dom, EventType.STARTED, "booted", {})
        except BaseException:
            await self.stop(dom, ShutoffReason.FAILED)
            raise

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, dom: QemuDomain, reason: ShutoffReason, *, grace: float = 0.0) -> None:
        """Kill *dom*'s QEMU (SIGTERM for *grace* seconds, then SIGKILL) and mark it shut off."""
        if dom.process is None and dom.monitor is None:
            if dom.active:
                self._forget(dom, reason)
            return
        dom.stopping = True
        mon, proc = dom.monitor, dom.process
        if mon is not None and proc is not None and grace <= 0:
            # SIGKILL needs no monitor: the kernel tears QEMU down while the monitor closes
            # (close() drops its disconnect callbacks before the kill is sent).
            await asyncio.gather(mon.close(), proc.kill())
            proc.close()
        else:
            if mon is not None:
                await mon.close()
            if proc is not None:
                await proc.kill(grace=grace)
                proc.close()
        self._forget(dom, reason)
        await self._cleanup_job(dom)

    def _forget(self, dom: QemuDomain, reason: ShutoffReason) -> None:
        was_active = dom.process is not None
        dom.process = None
        dom.monitor = None
        dom.run_id = None
        dom.migration.status = MigrationStatus.NONE
        dom.block_jobs.clear()
        # A killed QEMU leaves its socket behind; a clean one removes it itself.
        self.paths(dom).qmp_socket.unlink(missing_ok=True)
        # No status write: on_stopped drops the status file right after (a write here
        # was one more status write per Confirm, of a file deleted a moment later).
        dom.set_state(DomainState.SHUTOFF, reason, save=False)
        if was_active:
            self._emit(dom, EventType.STOPPED, str(reason), {})
        self._on_stopped(dom)

    async def _cleanup_job(self, dom: QemuDomain) -> None:
        # A migration job parked between API calls dies with its QEMU (libvirt's
        # qemuMigrationJobContinue cleanup callback).
        if dom.job.async_job != AsyncJob.NONE and not dom.job.owned:
            await dom.job.run_cleanup()

    # -- watching ----------------------------------------------------------------------------

    def _watch(self, dom: QemuDomain) -> None:
        proc, mon = dom.process, dom.monitor
        assert proc is not None and mon is not None
        mon.add_event_handler(lambda name, data, ts: self._on_event(dom, name, data, ts))
        mon.on_disconnect(lambda: self._on_gone(dom, proc.pid))
        proc.on_exit(lambda: self._on_gone(dom, proc.pid))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_gone(self, dom: QemuDomain, pid: int) -> None:
        """QEMU exited or its monitor closed without the daemon asking: a crash."""
        if dom.stopping or dom.process is None or dom.process.pid != pid:
            return
        log.warning("QEMU of domain %s (pid %d) went away", dom.name, pid)
        self._spawn(self.stop(dom, ShutoffReason.CRASHED))

    def _on_event(self, dom: QemuDomain, name: str, data: dict[str, Any], ts: float) -> None:
        if trace.enabled():  # how late the daemon sees QEMU's event (QEMU's timestamp -> here)
            what = f"{name} {data.get('status') or ''}".strip()
            trace.point("qemu event", what, wall=ts, seconds=time.time() - ts)
        handler = _EVENT_HANDLERS.get(name)
        if handler is not None:
            handler(self, dom, data, ts)
        elif name in blockjob.EVENTS:
            blockjob.on_event(dom, name, data)
        dom.notify()

    def _stop_event(self, dom: QemuDomain, data: dict[str, Any], ts: float) -> None:
        if dom.job.async_job == AsyncJob.MIGRATION_OUT:
            dom.migration.stopped = ts
        # The STOP that follows a guest power-off (-no-shutdown) is not a pause.
        if dom.state == DomainState.PAUSED or dom.stopping:
            return
        reason = dom.pending_pause_reason or (
            PausedReason.MIGRATION
            if dom.job.async_job == AsyncJob.MIGRATION_OUT
            else PausedReason.UNKNOWN
        )
        dom.pending_pause_reason = ""
        dom.set_state(DomainState.PAUSED, reason)
        self._emit(dom, EventType.SUSPENDED, str(reason), {})

    def _resume_event(self, dom: QemuDomain, data: dict[str, Any], ts: float) -> None:
        if dom.job.async_job == AsyncJob.MIGRATION_IN:
            dom.migration.resumed = ts  # the guest-visible downtime ends here
        if dom.state == DomainState.RUNNING:
            return
        reason = dom.pending_resume_reason or RunningReason.UNPAUSED
        dom.pending_resume_reason = ""
        dom.set_state(DomainState.RUNNING, reason)
        if reason != RunningReason.BOOTED:  # the first cont is part of "started"
            self._emit(dom, EventType.RESUMED, str(reason), {})

    def _shutdown_event(self, dom: QemuDomain, data: dict[str, Any], ts: float) -> None:
        # -no-shutdown keeps QEMU around after a guest poweroff; on_poweroff decides.
        self._emit(dom, EventType.SHUTDOWN, "guest" if data.get("guest") else "host", {})
        if dom.fake_reboot:
            dom.fake_reboot = False
            dom.pending_pause_reason = PausedReason.SHUTTING_DOWN
            self._spawn(self._fake_reboot(dom))
            return
        if dom.definition.on_poweroff == "preserve":
            return
        dom.stopping = True
        self._spawn(self.stop(dom, ShutoffReason.SHUTDOWN))

    async def _fake_reboot(self, dom: QemuDomain) -> None:
        """The guest powered off for a reboot: reset it and run it again in the same QEMU.

        libvirt's qemuProcessFakeReboot: QEMU runs with -no-shutdown, so the powered-off
        machine waits for a reset; ``cont`` is refused until QEMU has done it (RESET event).
        """
        mon = dom.monitor
        if mon is None:
            return
        try:
            before = dom.resets
            await mon.execute("system_reset")
            if not await dom.wait_for(lambda: dom.resets > before, 10.0):
                raise VmferryError(ErrorCode.OPERATION_FAILED, "QEMU did not reset the guest")
            dom.pending_resume_reason = RunningReason.BOOTED
            await mon.execute("cont")
        except VmferryError as err:
            if dom.stopping or dom.monitor is None:
                return  # destroyed meanwhile
            log.error("domain %s: cannot reboot after its power-off: %s", dom.name, err.message)
            await self.stop(dom, ShutoffReason.SHUTDOWN)

    def _reset_event(self, dom: QemuDomain, data: dict[str, Any], ts: float) -> None:
        dom.resets += 1
        self._emit(dom, EventType.REBOOT, "guest" if data.get("guest") else "host", {})

    def _migration_event(self, dom: QemuDomain, data: dict[str, Any], ts: float) -> None:
        status = MigrationStatus.of(data)
        dom.migration.status = status
        if dom.job.async_job == AsyncJob.MIGRATION_OUT:
            self._postcopy_source_reason(dom, status)
        elif dom.job.async_job == AsyncJob.MIGRATION_IN:
            self._postcopy_destination_reason(dom, status)

    def _postcopy_source_reason(self, dom: QemuDomain, status: MigrationStatus) -> None:
        # libvirt's qemuProcessHandleMigrationStatus: post-copy shows in the paused reason.
        if dom.state != DomainState.PAUSED:
            return
        if status in _POSTCOPY_RUNNING:
            if dom.reason in (PausedReason.MIGRATION, PausedReason.POSTCOPY_FAILED):
                dom.set_state(DomainState.PAUSED, PausedReason.POSTCOPY)
                self._emit(dom, EventType.SUSPENDED, str(PausedReason.POSTCOPY), {})
        elif (
            status == MigrationStatus.POSTCOPY_PAUSED and dom.reason != PausedReason.POSTCOPY_FAILED
        ):
            dom.set_state(DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
            self._emit(dom, EventType.SUSPENDED, str(PausedReason.POSTCOPY_FAILED), {})

    def _postcopy_destination_reason(self, dom: QemuDomain, status: MigrationStatus) -> None:
        if dom.state == DomainState.PAUSED:
            # libvirt corrects the incoming guest's reason too: persisted, it tells a restart
            # that the source's copy is stale even if QEMU has completed meanwhile.
            if status in _POSTCOPY_RUNNING and dom.reason == PausedReason.MIGRATION:
                dom.set_state(DomainState.PAUSED, PausedReason.POSTCOPY)
            return
        # The guest already runs here once Finish resumed it; only the reason says it waits.
        if dom.state != DomainState.RUNNING:
            return
        if (
            status == MigrationStatus.POSTCOPY_PAUSED
            and dom.reason != RunningReason.POSTCOPY_FAILED
        ):
            dom.set_state(DomainState.RUNNING, RunningReason.POSTCOPY_FAILED)
            self._emit(dom, EventType.RESUMED, str(RunningReason.POSTCOPY_FAILED), {})
        elif status in _POSTCOPY_RUNNING and dom.reason == RunningReason.POSTCOPY_FAILED:
            dom.set_state(DomainState.RUNNING, RunningReason.POSTCOPY)

    def _migration_pass_event(self, dom: QemuDomain, data: dict[str, Any], ts: float) -> None:
        dom.migration.iteration = int(data.get("pass", 0))
        self._emit(dom, EventType.MIGRATION_ITERATION, "", {"iteration": dom.migration.iteration})

    # -- restart ------------------------------------------------------------------------------

    async def reconnect(self, dom: QemuDomain, pid: int | None) -> bool:
        """Re-attach to the QEMU of a domain that was running before the daemon restarted.

        Returns False (and marks the domain crashed) when that QEMU is gone.
        """
        paths = self.paths(dom)
        found = None
        if pid is None:
            # The daemon died while QEMU was starting: that start never finished.
            await _kill_orphans(qmp_marker(paths.qmp_socket))
        else:
            try:
                found = await reattach(
                    pid, uuid=dom.uuid, qmp_socket=paths.qmp_socket, name=dom.name
                )
            except VmferryError as err:
                return self._unmanaged(dom, pid, err)
        if found is None:
            dom.process = None
            self._forget_crashed(dom)
            return False
        dom.process, dom.monitor = found
        if dom.run_id is not None:
            self.reserve_ids(dom.run_id)
        else:
            dom.run_id = self._next_id
            self._next_id += 1
        self._watch(dom)
        status = await dom.monitor.execute("query-status")
        running = bool(status.get("running"))
        if running and dom.state != DomainState.RUNNING:
            dom.set_state(DomainState.RUNNING, RunningReason.UNKNOWN)
        elif not running and dom.state != DomainState.PAUSED:
            dom.set_state(DomainState.PAUSED, PausedReason.UNKNOWN)
        else:
            dom.save()
        return True

    def _unmanaged(self, dom: QemuDomain, pid: int, err: VmferryError) -> bool:
        """A live QEMU whose monitor is out of reach: keep the guest running, allow destroy."""
        proc = QemuProcess.attach(pid, expect_in_cmdline=dom.uuid)
        if proc is None:
            dom.process = None
            self._forget_crashed(dom)
            return False
        log.error(
            "domain %s: QEMU pid %d is alive but its monitor cannot be reached (%s); "
            "it is left running unmanaged (state nostate, reason monitor-lost): "
            "only destroy works",
            dom.name,
            pid,
            err.message,
        )
        dom.process, dom.monitor = proc, None
        if dom.run_id is not None:
            self.reserve_ids(dom.run_id)
        proc.on_exit(lambda: self._on_gone(dom, pid))
        dom.set_state(DomainState.NOSTATE, ErrorReason.MONITOR_LOST)
        return True

    def _forget_crashed(self, dom: QemuDomain) -> None:
        self.paths(dom).qmp_socket.unlink(missing_ok=True)
        dom.monitor = None
        dom.run_id = None
        dom.set_state(DomainState.SHUTOFF, ShutoffReason.CRASHED, save=False)  # as _forget
        self._emit(dom, EventType.STOPPED, str(ShutoffReason.CRASHED), {})
        self._on_stopped(dom)

    @staticmethod
    def qemu_pids(qmp_socket: Path) -> list[int]:
        """Processes whose command line names *qmp_socket* (a domain's QEMU we may not know)."""
        return _pids_naming(qmp_marker(qmp_socket))

    async def close(self) -> None:
        """Detach from every watched QEMU without touching it (daemon shutdown)."""
        for task in list(self._tasks):
            await task


def _pids_naming(marker: str) -> list[int]:
    needle = marker.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def _kill_orphans(marker: str) -> None:
    """Kill QEMU processes whose command line names *marker* (their QMP socket)."""
    for pid in _pids_naming(marker):
        proc = QemuProcess.attach(pid, expect_in_cmdline=marker)
        if proc is not None:
            log.warning("killing QEMU pid %d left behind by an unfinished start", pid)
            await proc.kill()
            proc.close()


#: QEMU migration states in which post-copy is alive (or being brought back).
_POSTCOPY_RUNNING = frozenset(
    {
        MigrationStatus.POSTCOPY_ACTIVE,
        MigrationStatus.POSTCOPY_RECOVER_SETUP,
        MigrationStatus.POSTCOPY_RECOVER,
    }
)

_EventHandler = Callable[[Lifecycle, QemuDomain, dict[str, Any], float], None]
_EVENT_HANDLERS: dict[str, _EventHandler] = {
    "STOP": Lifecycle._stop_event,
    "RESUME": Lifecycle._resume_event,
    "SHUTDOWN": Lifecycle._shutdown_event,
    "RESET": Lifecycle._reset_event,
    "MIGRATION": Lifecycle._migration_event,
    "MIGRATION_PASS": Lifecycle._migration_pass_event,
}
