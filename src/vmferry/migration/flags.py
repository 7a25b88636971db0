"""Migration flags with virsh's meanings (libvirt's VIR_MIGRATE_*)."""

from __future__ import annotations

from enum import IntFlag

from vmferry.errors import ErrorCode, VmferryError


class MigrateFlags(IntFlag):
    LIVE = 1 << 0
    PEER2PEER = 1 << 1
    TUNNELLED = 1 << 2  # the stream travels inside the daemons' own connection (p2p only)
    PERSIST_DEST = 1 << 3
    UNDEFINE_SOURCE = 1 << 4
    PAUSED = 1 << 5  # leave the guest paused on the destination (--suspend)
    NON_SHARED_DISK = 1 << 6  # --copy-storage-all: mirror each disk's whole chain
    NON_SHARED_INC = 1 << 7  # --copy-storage-inc: mirror the top layer only
    CHANGE_PROTECTION = 1 << 8
    OFFLINE = 1 << 10
    COMPRESSED = 1 << 11  # xbzrle
    AUTO_CONVERGE = 1 << 13
    POSTCOPY = 1 << 15
    TLS = 1 << 16  # QEMU encrypts the stream with the certificates of [tls] pki_dir
    PARALLEL = 1 << 17  # multifd
    # --copy-storage-synchronous-writes: write-blocking mirrors, so a disk-busy guest converges
    NON_SHARED_SYNCHRONOUS_WRITES = 1 << 18
    POSTCOPY_RESUME = 1 << 19  # resume a post-copy migration that failed (with POSTCOPY)

    # flags that mean something to the source only and are not sent to the destination
    @classmethod
    def source_only(cls) -> MigrateFlags:
        return cls.AUTO_CONVERGE | cls.UNDEFINE_SOURCE

    @classmethod
    def copy_storage(cls) -> MigrateFlags:
        """The flags that make a migration copy (some of) the guest's disks."""
        return cls.NON_SHARED_DISK | cls.NON_SHARED_INC


#: Every bit vmferry knows; anything else from a client is refused, as libvirt's
#: virCheckFlags does.
KNOWN_FLAGS = sum(int(flag) for flag in MigrateFlags)


def parse_flags(value: object) -> MigrateFlags:
    """
    A client's migration flags, refusing unknown bits.

    :raise VmferryError: ``INVALID_ARG`` for a non-integer, a negative value or
        a bit vmferry does not know (named in hexadecimal).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VmferryError(ErrorCode.INVALID_ARG, "migration flags must be a non-negative integer")
    unknown = value & ~KNOWN_FLAGS
    if unknown:
        shown = f"0x{unknown:x}" if unknown.bit_length() <= 64 else "beyond bit 63"
        raise VmferryError(ErrorCode.INVALID_ARG, f"unsupported migration flags {shown}")
    return MigrateFlags(value)
