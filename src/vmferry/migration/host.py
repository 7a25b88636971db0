"""What the migration steps need from the daemon that runs them.

The daemon's migration service provides it; keeping it a protocol lets the
migration layer sit below the daemon (libvirt's qemu_migration.c calls into
the driver through ``virQEMUDriver`` the same way). Peer-to-peer reaches the
destination daemon through a :class:`PeerConnector` the daemon provides
(libvirt's p2p opens a remote ``virConnect``), since this layer is below the
client library.
"""

from __future__ import annotations

import socket
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vmferry.domain.model import DiskDef, DomainDef
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.lifecycle import Lifecycle

if TYPE_CHECKING:
    from vmferry.migration.cookie import NbdDisk
    from vmferry.migration.flags import MigrateFlags
    from vmferry.migration.params import MigrationParams
    from vmferry.migration.peer_probe import MigrationPeer
    from vmferry.migration.policy.contract import ConvergenceDefaults
    from vmferry.migration.postcopy_watch import PostcopyWatch
    from vmferry.migration.protocol import DestinationSide
    from vmferry.migration.tls import TlsSetup
    from vmferry.migration.tunnel import Sender


@dataclass(frozen=True)
class PerformLimits:
    """How long a Perform may run (``[migration] perform_stall_timeout``, ``perform_timeout``).

    A destination that stops reading (hung, SIGSTOPped, link gone without a
    reset) must not leave the source migrating, or paused, for ever.
    """

    stall_s: float = 60.0  # without the stream moving (bytes sent or QEMU's status)
    total_s: float = 0.0  # in all; 0: no overall limit


@dataclass(frozen=True)
class Keepalive:
    """libvirt's keepalive towards a peer daemon (``[keepalive] interval``, ``count``)."""

    interval: float = 5.0  # seconds between probes; 0: off
    count: int = 5  # unanswered probes in a row before the peer is dead


@dataclass(frozen=True)
class PeerHost:
    """What a peer daemon says about its host."""

    uuid: str
    features: frozenset[str]


@dataclass(frozen=True)
class PeerDomain:
    """What a peer daemon says about one of its domains."""

    uuid: str
    state: str
    async_job: str


class PeerConnection(Protocol):
    """An open connection to another daemon (a remote ``virConnect``)."""

    @property
    def uri(self) -> str: ...

    async def host(self, *, request_timeout: float | None = None) -> PeerHost:
        """The peer's host identity (also the keepalive probe)."""
        ...

    async def dominfo(self, name: str) -> PeerDomain:
        """The peer's domain *name* (``NO_DOMAIN`` when it has none)."""
        ...

    def destination(self) -> AbstractAsyncContextManager[DestinationSide]:
        """The peer as a migration destination, within a session held open meanwhile."""
        ...

    async def tunnel(self, name: str, qemu: socket.socket, stream: str = "") -> None:
        """Splice *qemu* (QEMU's socket-pair end) and a pipe to the peer's incoming *name*."""
        ...


class PeerConnector(Protocol):
    """Opens connections to other daemons (the daemon provides it; it owns the client)."""

    def connect(self, uri: str, *, timeout: float) -> AbstractAsyncContextManager[PeerConnection]:
        """A connection to the daemon at *uri*, every call bounded by *timeout* seconds."""
        ...


class MigrationHost(Protocol):
    @property
    def lifecycle(self) -> Lifecycle: ...

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

    # -- the domain's cluster lease (vmferry.daemon.lease), libvirt's lock manager -------------

    @property
    def lease_driver(self) -> str:
        """The lock driver named in the cookie's ``<lockstate>`` (``none``: no cluster)."""
        ...

    async def take_lease(self, dom: QemuDomain, *, previous: str = "") -> None:
        """Take *dom*'s lease before its guest runs here (``LEASE_HELD`` if another host has it)."""
        ...

    def release_lease(self, dom: QemuDomain) -> None:
        """Give *dom*'s lease up: its guest is stopped here for the switch-over."""
        ...

    async def lease_holder(self, uuid: str) -> str:
        """The host UUID that holds the lease of domain *uuid* ("" nobody, or unknown)."""
        ...

    def release_port(self, port: int) -> None: ...

    def migration_address(self, requested: str) -> str: ...

    # -- storage migration: this host's copy of a disk ----------------------------------------

    def disk_path(self, disk: DiskDef) -> str:
        """Where *disk*'s data lives on this host (its file, or its volume in this host's pool)."""
        ...

    def disk_exists(self, path: str) -> bool: ...

    async def create_disk(self, path: str, disk: DiskDef, copied: NbdDisk) -> bool:
        """Create *path* for *disk* (its format, the *copied* disk's capacity, on top of its
        backing file, which must exist here); False if it appeared meanwhile (not created).

        :raise VmferryError: the path is not allowed, or no room.
        """
        ...

    async def delete_disk(self, path: str) -> None:
        """Delete a disk :meth:`create_disk` made."""
        ...

    @property
    def perform_limits(self) -> PerformLimits: ...

    @property
    def tls(self) -> TlsSetup:
        """``[migration] tls``, the PKI and how QEMU gets a copy (vmferry.migration.tls)."""
        ...

    @property
    def convergence(self) -> ConvergenceDefaults:
        """``[migration] downtime_target_ms``, ``deadline_s``, ``policy``: the default contract."""
        ...

    async def stream_uri(self, uri: str) -> str:
        """*uri* checked (only ``tcp:`` to allowed networks) and as QEMU must get it."""
        ...

    def bind_session(self, session: str, dom: QemuDomain) -> None: ...

    def unbind_session(self, dom: QemuDomain) -> None: ...

    # -- peer-to-peer, the peer probe and post-copy supervision ---------------------------------

    @property
    def migration_peers(self) -> dict[str, MigrationPeer]:
        """Where each outgoing migration went, by domain uuid (persisted with the status)."""
        ...

    @property
    def keepalive(self) -> Keepalive: ...

    @property
    def peers(self) -> PeerConnector: ...

    @property
    def postcopy_watch(self) -> PostcopyWatch:
        """The post-copy watchers of this host (one per domain)."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run *coro* in the background until it ends or the daemon stops."""
        ...

    async def check_peer(self, uri: str, what: str) -> None:
        """*uri* of another daemon this one is asked to call (refused unless allowed)."""
        ...

    def dumpxml(self, dom: QemuDomain, *, migratable: bool, inactive: bool) -> str: ...

    async def source_begin(
        self, dom: QemuDomain, flags: MigrateFlags, params: MigrationParams, session: str = ""
    ) -> tuple[str, str]:
        """Begin (or Begin of a post-copy resume) on this, the source host."""
        ...

    async def source_perform(
        self, dom: QemuDomain, cookie: str, uri: str, *, tunnel: Sender | None = None
    ) -> str:
        """Perform on the source; watches a migration that switched to post-copy."""
        ...

    async def source_confirm(self, dom: QemuDomain, cookie: str, *, cancelled: bool) -> None:
        """Confirm on the source."""
        ...

    async def job_abort(self, dom: QemuDomain, *, postcopy_pause: bool = False) -> None:
        """``domjobabort``."""
        ...
