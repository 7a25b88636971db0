"""Whether a migration stream is encrypted, and QEMU's TLS set up for it.

``[migration] tls`` of each daemon:

* ``off`` (default, as libvirt): TLS when the client asks (``--tls``);
* ``on``: TLS also when not asked, whenever both hosts have a PKI;
* ``required``: like ``on``, and a migration that would run without TLS is
  refused in either direction (libvirt's ``migrate_tls_force``), with
  ``TLS_REQUIRED``.

The two daemons agree through the cookie (vmferry's ``<tls>`` element,
ignored by libvirt): Begin offers (this host has a PKI, its mode), Prepare
decides and answers (``use``), and the destination's QEMU is set up before
Perform; Perform follows the answer, or refuses it when its own rules forbid
it. v2 has no cookie before Prepare: there ``--tls`` alone decides.

A tunnelled stream (:mod:`vmferry.migration.tunnel`) is encrypted by the
daemons' own mutual-TLS connection, not by QEMU.

An encrypted stream the client did not make parallel runs over multifd
channels (``[migration] tls_channels``, 2 by default, the smaller of both
hosts'; see :func:`shape`): QEMU's TLS costs a record, a system call and a decryption per
guest page and per page header, which one migration thread and the
destination's main loop cannot do at the plain stream's speed; each multifd
channel encrypts and decrypts in its own thread (docs/migration-tls.md has
the measurements). Begin offers its count (``<tls channels='N'/>``; an older
source offers none and gets one stream), Prepare decides and answers it,
Perform follows, so both QEMUs always agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.cookie import MigrationCookie
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.qemu import tls_creds
from vmferry.qemu.confine import QemuUser
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)

MODES = ("off", "on", "required")
#: The QOM id of the migration stream's credentials in each QEMU.
MIGRATION_CREDS = "vmferry-migration-tls"


@dataclass(frozen=True)
class TlsSetup:
    """One host's TLS rules and what QEMU's credentials are made from."""

    mode: str = "off"
    pki_dir: Path | None = None
    staging: Path = field(default_factory=lambda: Path("/nonexistent"))  # STATE/qemu-tls
    user: QemuUser | None = None
    channels: int = 2  # [migration] tls_channels: multifd channels of an encrypted stream

    @property
    def has_pki(self) -> bool:
        return tls_creds.has_pki(self.pki_dir)


def _required(where: str, why: str) -> VmferryError:
    return VmferryError(
        ErrorCode.TLS_REQUIRED,
        f'{where} accepts only encrypted migrations ([migration] tls = "required") and {why}',
    )


def _no_pki(setup: TlsSetup, what: str) -> VmferryError:
    where = f"[tls] pki_dir ({setup.pki_dir})" if setup.pki_dir else "no [tls] pki_dir"
    return VmferryError(
        ErrorCode.OPERATION_INVALID,
        f"{what} needs this host's PKI (ca.pem, server.pem, client.pem and their keys), "
        f"but it has {where}: run `vmferry pki init` and copy the directory to every host",
    )


def offer(setup: TlsSetup, flags: MigrateFlags, cookie: MigrationCookie) -> None:
    """Begin (source): check what this side can do and offer it in *cookie*."""
    tunnelled = bool(flags & MigrateFlags.TUNNELLED)
    if flags & MigrateFlags.TLS and not setup.has_pki:
        raise _no_pki(setup, "--tls")
    if setup.mode == "required" and not setup.has_pki and not tunnelled:
        raise _required("this source host", "has no PKI to encrypt with")
    cookie.tls_pki = setup.has_pki
    cookie.tls_mode = setup.mode
    cookie.tls_channels = setup.channels or None  # what this source can follow


def decide(setup: TlsSetup, flags: MigrateFlags, cookie: MigrationCookie | None) -> bool:
    """Prepare (destination): whether QEMU's stream is encrypted, from Begin's offer *cookie*.

    :raise VmferryError: ``TLS_REQUIRED`` when either host requires TLS and it cannot be had.
    """
    if flags & MigrateFlags.TUNNELLED:
        return False  # inside the daemons' own TLS connection
    source_pki = bool(cookie is not None and cookie.tls_pki)
    source_mode = cookie.tls_mode if cookie is not None and cookie.tls_mode in MODES else "off"
    # "on" on either side: encrypted whenever both can
    automatic = setup.mode != "off" or source_mode != "off"
    use = bool(flags & MigrateFlags.TLS) or (setup.has_pki and source_pki and automatic)
    if use and not setup.has_pki:
        raise _no_pki(setup, "an encrypted migration (--tls)")
    if not use and setup.mode == "required":
        why = "the source has no PKI" if cookie is not None else "--tls was not given"
        raise _required("this destination host", why)
    if not use and source_mode == "required":
        raise _required("the source host", "this destination has no PKI")
    return use


def follow(setup: TlsSetup, flags: MigrateFlags, answer: MigrationCookie | None) -> bool:
    """Perform (source): whether to encrypt, as the destination's Prepare answered."""
    if flags & MigrateFlags.TUNNELLED:
        return False
    use = answer.tls_use if answer is not None and answer.tls_use is not None else False
    use = use or bool(flags & MigrateFlags.TLS)
    if answer is not None and answer.tls_use is False and flags & MigrateFlags.TLS:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            "the destination did not prepare an encrypted stream although --tls was given",
        )
    if not use and setup.mode == "required":
        raise _required("this source host", "the destination prepared a plain stream")
    if use and not setup.has_pki:
        raise _no_pki(setup, "an encrypted migration")
    return use


#: What multifd cannot go with (xbzrle, post-copy as vmferry runs it) or already chose.
_ONE_STREAM = (
    MigrateFlags.PARALLEL
    | MigrateFlags.POSTCOPY
    | MigrateFlags.COMPRESSED
    | MigrateFlags.TUNNELLED
    | MigrateFlags.OFFLINE
)


def channels(setup: TlsSetup, flags: MigrateFlags, use: bool, offered: int | None) -> int:
    """Prepare (destination): multifd channels for an encrypted stream; 0: as the client asked.

    :param offered: the source's count from Begin's cookie (None: an older source).
    """
    if not use or flags & _ONE_STREAM or not offered:
        return 0
    return min(setup.channels, offered)


def answered_channels(setup: TlsSetup, answer: MigrationCookie, use: bool) -> int | None:
    """Perform (source): the channel count Prepare answered, never more than this host offered.

    :raise VmferryError: ``OPERATION_FAILED`` for an answer above this host's own count
        (the cookie passes through the client).
    """
    if not use or not answer.tls_channels:
        return None
    if answer.tls_channels > setup.channels:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"the destination prepared {answer.tls_channels} TLS channels, more than this "
            f"host's [migration] tls_channels ({setup.channels}) offered",
        )
    return answer.tls_channels


def shape(
    flags: MigrateFlags, params: MigrationParams, count: int | None
) -> tuple[MigrateFlags, MigrationParams]:
    """The flags and parameters QEMU runs with: *count* multifd channels when given.

    Both sides call it, the destination with its own :func:`channels`, the source
    with the count Prepare answered (never more than the cookie allows).
    """
    if not count or flags & _ONE_STREAM:
        return flags, params
    return flags | MigrateFlags.PARALLEL, params.copy(parallel_connections=count)


async def enable(
    setup: TlsSetup, dom: QemuDomain, *, server: bool, hostname: str = ""
) -> dict[str, str]:
    """Give QEMU the credentials; return the migration parameters that use them.

    :param hostname: the source: the destination's name or address as its
        certificate must carry it (the migration URI's host).
    """
    assert setup.pki_dir is not None
    mon = dom.require_monitor()
    await tls_creds.add_x509(
        mon,
        setup.pki_dir,
        setup.staging,
        MIGRATION_CREDS,
        "server" if server else "client",
        setup.user,
    )
    dom.migration.tls = True
    out = {"tls-creds": MIGRATION_CREDS}
    if hostname:
        out["tls-hostname"] = hostname
    return out


async def disable(dom: QemuDomain) -> None:
    """After the migration: QEMU forgets the credentials (errors only logged)."""
    if not dom.migration.tls:
        return
    dom.migration.tls = False
    mon = dom.monitor
    if mon is None or not mon.connected:
        return
    try:
        await mon.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
    except VmferryError as err:
        log.warning("resetting the TLS parameters of %s: %s", dom.name, err.message)
    await tls_creds.remove_x509(mon, MIGRATION_CREDS)
