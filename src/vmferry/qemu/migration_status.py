"""QEMU's migration statuses (``MigrationStatus`` in QEMU's qapi/migration.json)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class MigrationStatus(StrEnum):
    """What ``query-migrate`` and the ``MIGRATION`` event report as ``status``.

    A status this QEMU version does not list is kept as it came (a pseudo
    member), so a newer QEMU's status is shown rather than refused.
    """

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @classmethod
    def _missing_(cls, value: object) -> MigrationStatus | None:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = value.upper().replace("-", "_")
        member._value_ = value
        return member

    @classmethod
    def of(cls, info: Any) -> MigrationStatus:
        """The ``status`` of a QMP reply or event *info* (``none`` when it has none)."""
        status = info.get("status", "none") if isinstance(info, dict) else "none"
        return cls(str(status))


#: The migration is over, one way or the other.
TERMINAL = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})
