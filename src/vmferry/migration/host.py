"""What the migration steps need from the daemon that runs them.

The daemon's driver provides it; keeping it a protocol lets the migration
layer sit below the daemon (libvirt's qemu_migration.c calls into the driver
through ``virQEMUDriver`` the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmferry.domain.model import DomainDef
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.lifecycle import Lifecycle


@dataclass(frozen=True)
class PerformLimits:
    """How long a Perform may run (``[migration] perform_stall_timeout``, ``perform_timeout``).

    A destination that stops reading (hung, SIGSTOPped, link gone without a
    reset) must not leave the source migrating, or paused, for ever.
    """

    stall_s: float = 60.0  # without the stream moving (bytes sent or QEMU's status)
    total_s: float = 0.0  # in all; 0: no overall limit


class MigrationHost(Protocol):
    lifecycle: Lifecycle

    @property
    def host_uuid(self) -> str: ...

    @property
    def hostname(self) -> str: ...

    def lookup(self, key: str) -> QemuDomain: ...

    def check_clash(
        self, definition: DomainDef, *, allow_inactive_same: bool
    ) -> QemuDomain | None: ...

    def check_definition(self, definition: DomainDef) -> None: ...

    def add(self, definition: DomainDef, persistent: DomainDef | None) -> QemuDomain: ...

    def remove(self, dom: QemuDomain) -> None: ...

    def persist_definition(self, definition: DomainDef) -> None: ...

    def unpersist_definition(self, dom: QemuDomain) -> None: ...

    def acquire_port(self) -> int: ...

    def release_port(self, port: int) -> None: ...

    def migration_address(self, requested: str) -> str: ...

    @property
    def perform_limits(self) -> PerformLimits: ...

    async def stream_uri(self, uri: str) -> str:
        """*uri* checked (only ``tcp:`` to allowed networks) and as QEMU must get it."""
        ...

    def bind_session(self, session: str, dom: QemuDomain) -> None: ...

    def unbind_session(self, dom: QemuDomain) -> None: ...
