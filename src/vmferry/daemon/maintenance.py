"""Maintenance mode of a host: while on, no incoming migration and no new domain (issue 9 §3).

Persisted in ``STATE_DIR/maintenance.json`` before it is reported as set, so a
daemon restart keeps a host that is being drained closed to new guests.
Guests already here keep running; migrating them away is what maintenance is for.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vmferry.api.models import MaintenanceInfo
from vmferry.daemon.state import StateDir, atomic_write
from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

FILE = "maintenance.json"
#: The longest reason kept (it is shown to every refused caller).
MAX_REASON = 200


class Maintenance:
    def __init__(self, state_root: Path, hostname: str) -> None:
        self.path = state_root / FILE
        self.hostname = hostname
        self.info = MaintenanceInfo()
        raw = StateDir.read_json(self.path) if self.path.exists() else None
        if isinstance(raw, dict):
            try:
                self.info = MaintenanceInfo.model_validate(raw)
            except ValueError:
                log.warning("%s is not a maintenance record: ignored", self.path)

    @property
    def on(self) -> bool:
        return self.info.on

    def set(self, on: bool, reason: str = "") -> MaintenanceInfo:
        """Turn maintenance *on* or off; written to disk before it takes effect."""
        if len(reason) > MAX_REASON or any(ord(c) < 0x20 for c in reason):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"maintenance reason: at most {MAX_REASON} printable characters",
            )
        if on and self.info.on:
            info = self.info.model_copy(update={"reason": reason or self.info.reason})
        else:
            info = MaintenanceInfo(on=on, since=time.time() if on else 0.0, reason=reason)
        atomic_write(self.path, info.model_dump_json())
        self.info = info
        log.info("maintenance %s%s", "on" if on else "off", f" ({reason})" if reason else "")
        return info

    def check(self, what: str) -> None:
        """Refuse *what* (e.g. ``an incoming migration``) while in maintenance."""
        if self.info.on:
            why = f" ({self.info.reason})" if self.info.reason else ""
            raise VmferryError(
                ErrorCode.HOST_MAINTENANCE,
                f"host '{self.hostname}' is in maintenance{why} and accepts no {what}; "
                f"choose another host, or end it with 'vmferry maintenance {self.hostname} off'",
            )
