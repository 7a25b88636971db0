"""The live domain object: definition, run state, job, and the QEMU behind it.

This is libvirt's ``virDomainObj`` plus ``qemuDomainObjPrivate``: everything the
daemon knows about one domain. Who may change it is decided by its
:class:`~vmferry.jobs.DomainJob`; the object itself only records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmferry import trace
from vmferry.domain.model import DomainDef
from vmferry.domain.state import DomainState
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import DomainJob
from vmferry.qemu.migration_status import MigrationStatus
from vmferry.qemu.monitor import Monitor
from vmferry.qemu.process import QemuProcess

if TYPE_CHECKING:  # the migration layer's type, kept here as libvirt's job private data is
    from vmferry.migration.params import MigrationParams
    from vmferry.qemu.blockjob import BlockJob


@dataclass
class MigrationProgress:
    """What QEMU said about the current migration (MIGRATION events, query-migrate)."""

    status: MigrationStatus = MigrationStatus.NONE
    iteration: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    started: float = 0.0
    stopped: float = 0.0  # when the source's vCPUs paused for the switchover
    resumed: float = 0.0  # when the destination's vCPUs ran again (QEMU's RESUME event)
    # bookkeeping of the migration job (libvirt keeps these in the job's private data)
    flags: int = 0
    params: MigrationParams | None = None  # None: no migration has run (all defaults)
    was_running: bool = False
    port: int = 0
    created_here: bool = False  # the destination made the domain object for this migration
    origin_name: str = ""  # the destination: the name on the source (before --dname)
    tls: bool = False  # QEMU holds TLS credentials for this migration's stream
    # tunnelled, the destination: the daemon's end of the socket pair, until the peer's
    # stream arrives (vmferry.migration.tunnel)
    tunnel: Any = None
    # storage migration: the disks copied (targets), the destination's NBD port, and the
    # volumes Prepare created there (deleted if the migration fails; never pre-existing ones)
    storage_disks: list[str] = field(default_factory=list)
    nbd_port: int = 0
    # tunnelled: the unix socket the NBD server listens on (a daemon-private directory;
    # each NBD tunnel of the peer is connected to it), "" otherwise
    nbd_socket: str = ""
    # tunnelled, the source: the relays of the NBD connections (asyncio tasks)
    nbd_relays: list[Any] = field(default_factory=list)
    created_volumes: list[str] = field(default_factory=list)


@dataclass
class QemuDomain:
    """One domain known to the daemon, running or not."""

    definition: DomainDef  # the live definition (or the persistent one when shut off)
    persistent: DomainDef | None  # None: transient
    job: DomainJob
    state: DomainState = DomainState.SHUTOFF
    reason: str = "unknown"
    run_id: int | None = None
    process: QemuProcess | None = None
    monitor: Monitor | None = None
    migration: MigrationProgress = field(default_factory=MigrationProgress)
    completed_job: dict[str, Any] | None = None
    # storage migration jobs by id, as QEMU's events describe them (vmferry.qemu.blockjob)
    block_jobs: dict[str, BlockJob] = field(default_factory=dict)
    max_speed_mib_s: int = 0  # migrate-setspeed; 0: unlimited
    # the reason the next STOP/RESUME event should carry (libvirt's "pausedReason" bookkeeping)
    pending_pause_reason: str = ""
    pending_resume_reason: str = ""
    # reboot asked the guest to power off: start it again in the same QEMU (libvirt's fakeReboot)
    fake_reboot: bool = False
    resets: int = 0  # RESET events seen from this QEMU
    # set while the daemon itself stops QEMU, so the exit is not taken for a crash
    stopping: bool = False
    # client session bound to this domain (Prepare's caller: libvirt's autodestroy)
    bound_session: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    save_status: Callable[[QemuDomain], None] | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def uuid(self) -> str:
        return self.definition.uuid

    @property
    def active(self) -> bool:
        return self.state not in (DomainState.SHUTOFF, DomainState.CRASHED)

    def set_state(self, state: DomainState, reason: str, *, save: bool = True) -> None:
        """Change the state and write the status (*save* False: the caller drops the file)."""
        self.state = state
        self.reason = str(reason)
        if save:
            self.save()
        self.notify()

    def save(self) -> None:
        if self.save_status is not None:
            self.save_status(self)

    def notify(self) -> None:
        """Wake every :meth:`wait_for` caller so it re-checks its predicate."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def require_active(self) -> None:
        if not self.active:
            raise VmferryError(ErrorCode.OPERATION_INVALID, f"domain '{self.name}' is not running")

    def require_monitor(self) -> Monitor:
        if self.monitor is None or not self.monitor.connected:
            raise VmferryError(ErrorCode.OPERATION_INVALID, f"domain '{self.name}' is not running")
        return self.monitor

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until *predicate* holds, re-checked on every change; False on timeout."""
        with trace.span("wait", _waiter):
            return await self._wait_for(predicate, timeout)

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return predicate()
        return True


def _waiter() -> str:
    """Who waits (for the trace)."""
    return trace.caller(frozenset({"_waiter", "wait_for", "_wait_for"}))
