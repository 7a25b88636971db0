"""Migration flags with virsh's meanings (libvirt's VIR_MIGRATE_*)."""

from __future__ import annotations

from enum import IntFlag


class MigrateFlags(IntFlag):
    LIVE = 1 << 0
    PEER2PEER = 1 << 1
    PERSIST_DEST = 1 << 3
    UNDEFINE_SOURCE = 1 << 4
    PAUSED = 1 << 5  # leave the guest paused on the destination (--suspend)
    CHANGE_PROTECTION = 1 << 8
    OFFLINE = 1 << 10
    COMPRESSED = 1 << 11  # xbzrle
    AUTO_CONVERGE = 1 << 13
    POSTCOPY = 1 << 15
    PARALLEL = 1 << 17  # multifd
    POSTCOPY_RESUME = 1 << 18  # resume a post-copy migration that failed (with POSTCOPY)

    # flags that mean something to the source only and are not sent to the destination
    @classmethod
    def source_only(cls) -> MigrateFlags:
        return cls.AUTO_CONVERGE | cls.UNDEFINE_SOURCE
