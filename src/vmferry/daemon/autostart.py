"""Autostart: persistent domains the daemon starts when it comes up (``virsh autostart``).

As libvirt does: the flag is a file ``autostart/NAME`` in the state directory (libvirt's
``autostart/NAME.xml`` link), it belongs to this host's definition (a migration does not
carry it; ``undefine`` drops it), and autostart runs once per host boot, not at every
daemon restart (libvirt's ``autostarted`` marker in ``/run``; here ``run/autostarted``
holds the kernel's boot id).  One more rule than libvirt: a domain that left this host by
migration (and stayed defined here) is not autostarted until it has been started here
again, since it most likely runs on the other host.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from vmferry.daemon.state import StateDir, atomic_write
from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    from vmferry.daemon.driver import Driver

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: What ``autostart/NAME`` holds once the domain migrated away from this host.
MIGRATED = "migrated\n"


def boot_id() -> str:
    """This host boot's id (a daemon restart keeps it, a reboot changes it)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class Autostart:
    """The autostart flags of one state directory."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._notes: dict[str, str] = {}  # name -> file content ("" or MIGRATED)

    def load(self) -> None:
        self._notes.clear()
        try:
            entries = list(self.state.autostart_dir.iterdir())
        except FileNotFoundError:
            return
        for path in entries:
            if path.name.startswith(".") or not path.is_file():
                continue  # temp files of atomic_write
            try:
                self._notes[path.name] = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                log.error("ignoring unreadable autostart flag %s: %s", path, exc)

    def enabled(self, name: str) -> bool:
        return name in self._notes

    def migrated_away(self, name: str) -> bool:
        return self._notes.get(name) == MIGRATED

    def set(self, name: str, enabled: bool) -> None:
        """Persist the flag of domain *name* (before anything acts on it)."""
        path = self.state.autostart_path(name)
        try:
            if enabled:
                if name not in self._notes:
                    atomic_write(path, "")
                    self._notes[name] = ""
            else:
                self.state.remove(path)
                self._notes.pop(name, None)
        except OSError as exc:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot change the autostart flag of domain '{name}' in {path}: "
                f"{exc.strerror or exc}",
            ) from exc

    def note(self, name: str, *, migrated: bool) -> None:
        """Record that *name* left by migration (or ran here again); flagged domains only."""
        text = MIGRATED if migrated else ""
        if self._notes.get(name, text) == text:
            return
        try:
            atomic_write(self.state.autostart_path(name), text)
        except OSError as exc:  # the flag itself is unchanged: worth a log line, not a failure
            log.error("domain %s: cannot update its autostart flag: %s", name, exc)
            return
        self._notes[name] = text

    def first_start_this_boot(self) -> bool:
        """Whether autostart has still to run in this host boot; marks it done if so."""
        current = boot_id()
        marker = self.state.autostarted_marker
        if current and StateDir.read_text(marker) == current + "\n":
            return False
        try:
            atomic_write(marker, current + "\n")  # persisted first: a crash does not repeat it
        except OSError as exc:
            log.error("cannot write %s: %s", marker, exc)
        return True


async def autostart_domains(driver: Driver) -> list[str]:
    """Start every flagged, inactive, persistent domain; return their names.

    Runs once per host boot, after restart recovery.  A domain that cannot start is logged
    and skipped: it never stops the daemon.
    """
    flags = driver.autostart
    if not flags.first_start_this_boot():
        log.info("autostart: already done in this host boot (%s)", boot_id() or "unknown")
        return []
    started = []
    for dom in list(driver.domains()):
        if not flags.enabled(dom.name) or dom.persistent is None:
            continue
        if dom.active or dom.job.async_job != "none":
            continue  # re-attached, or a migration job recovery owns it
        if flags.migrated_away(dom.name):
            log.warning(
                "autostart: domain %s left this host by migration; not starting it here "
                "(start it by hand if it is no longer running elsewhere)",
                dom.name,
            )
            continue
        try:
            await driver.start(dom)
        except VmferryError as err:
            log.error("autostart: cannot start domain %s: %s", dom.name, err.message)
            continue
        except Exception:
            log.exception("autostart: cannot start domain %s", dom.name)
            continue
        log.info("autostart: started domain %s", dom.name)
        started.append(dom.name)
    return started
