"""What the migration steps need from the daemon that runs them.

The daemon's driver provides it; keeping it a protocol lets the migration
layer sit below the daemon (libvirt's qemu_migration.c calls into the driver
through ``virQEMUDriver`` the same way).
"""

from __future__ import annotations

from typing import Protocol

from vmferry.domain.model import DomainDef
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.lifecycle import Lifecycle


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

    def bind_session(self, session: str, dom: QemuDomain) -> None: ...

    def unbind_session(self, dom: QemuDomain) -> None: ...
