"""The virsh verbs beyond start/stop: reboot, reset, autostart, domstats, domiflist,
vncdisplay, setmaxmem and setmem, each under the job rules of the driver.

Modify verbs take a ``modify`` job, so a migration refuses them with the usual lock
error; queries take a ``query`` job (or none when they only read the definition).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vmferry.api.verbs import InterfaceInfo, MemoryRequest, VncDisplay
from vmferry.daemon.domstats import GROUPS, domain_stats
from vmferry.daemon.driver import Driver
from vmferry.domain.model import DomainDef
from vmferry.domain.state import DomainState
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import Job
from vmferry.qemu.domain import QemuDomain

log = logging.getLogger(__name__)


def _invalid(message: str) -> VmferryError:
    return VmferryError(ErrorCode.OPERATION_INVALID, message)


class DomainVerbs:
    """The verbs, over the driver's domains."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    # -- reboot, reset -----------------------------------------------------------------------

    async def reboot(self, dom: QemuDomain) -> QemuDomain:
        """Ask the guest to reboot (ACPI power button, then a reset in the same QEMU).

        Like ``virsh reboot --mode acpi``: returns once asked; the guest may ignore it.
        """
        async with dom.job.acquire(Job.MODIFY, "reboot"):
            mon = dom.require_monitor()
            if dom.state != DomainState.RUNNING:
                raise _invalid(f"domain '{dom.name}' is not running (it is {dom.state})")
            if not dom.definition.features.acpi:
                raise VmferryError(
                    ErrorCode.OPERATION_INVALID,
                    f"domain '{dom.name}' has no ACPI (<features><acpi/>): "
                    "it cannot be asked to reboot; use reset",
                )
            dom.fake_reboot = True
            dom.save()  # persisted first: a restarted daemon still reboots it (libvirt too)
            try:
                await mon.execute("system_powerdown")
            except BaseException:
                dom.fake_reboot = False
                dom.save()
                raise
        return dom

    async def reset(self, dom: QemuDomain) -> QemuDomain:
        """Reset the machine at once, like pressing its reset button (QMP system_reset)."""
        async with dom.job.acquire(Job.MODIFY, "reset"):
            mon = dom.require_monitor()
            await mon.execute("system_reset")
        return dom

    # -- autostart ---------------------------------------------------------------------------

    async def set_autostart(self, dom: QemuDomain, enabled: bool) -> QemuDomain:
        async with dom.job.acquire(Job.MODIFY, "autostart"):
            if dom.persistent is None:
                raise _invalid(f"cannot set autostart for transient domain '{dom.name}'")
            self.driver.autostart.set(dom.name, enabled)
        return dom

    # -- queries -----------------------------------------------------------------------------

    async def stats(self, names: list[str], groups: list[str]) -> dict[str, dict[str, Any]]:
        """``domstats``: the statistics of *names* (all domains if empty), by domain name."""
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"unknown statistics group(s) {', '.join(unknown)} (known: {', '.join(GROUPS)})",
            )
        wanted = frozenset(groups or GROUPS)
        doms = [self.driver.lookup(n) for n in names] if names else list(self.driver.domains())
        return {dom.name: await domain_stats(dom, wanted) for dom in doms}

    @staticmethod
    def interfaces(dom: QemuDomain) -> list[InterfaceInfo]:
        """``domiflist``: the NICs of the live definition."""
        return [
            InterfaceInfo(
                interface=f"hostnet{i}", type=nic.type, source="-", model=nic.model, mac=nic.mac
            )
            for i, nic in enumerate(dom.definition.devices.interfaces)
        ]

    async def vncdisplay(self, dom: QemuDomain) -> VncDisplay:
        """``vncdisplay``: where the running domain's VNC server listens."""
        graphics = [g for g in dom.definition.devices.graphics if g.type == "vnc"]
        if not graphics:
            raise _invalid(f"domain '{dom.name}' has no VNC graphics")
        dom.require_active()
        async with dom.job.acquire(Job.QUERY, "vncdisplay"):
            mon = dom.require_monitor()
            info = await mon.execute("query-vnc")
        if not isinstance(info, dict) or not info.get("enabled") or not info.get("service"):
            raise VmferryError(ErrorCode.OPERATION_FAILED, "QEMU reports no VNC server")
        port = int(info["service"])
        host = str(info.get("host") or graphics[0].listen)
        return VncDisplay(listen=host, port=port, display=port - 5900)

    # -- memory ------------------------------------------------------------------------------

    async def set_max_memory(self, dom: QemuDomain, req: MemoryRequest) -> QemuDomain:
        """``setmaxmem``: only the persistent definition can change (libvirt's rule for QEMU)."""
        async with dom.job.acquire(Job.MODIFY, "setmaxmem"):
            live, config = self._targets(dom, req)
            if live:
                raise VmferryError(
                    ErrorCode.OPERATION_INVALID,
                    f"cannot resize the maximum memory of running domain '{dom.name}' "
                    "(use --config, effective at its next start)",
                )
            assert dom.persistent is not None and config
            new = dataclasses.replace(
                dom.persistent,
                memory_kib=req.size_kib,
                current_memory_kib=min(dom.persistent.current_memory_kib, req.size_kib),
            )
            self._persist(dom, new)
        return dom

    async def set_memory(self, dom: QemuDomain, req: MemoryRequest) -> QemuDomain:
        """``setmem``: the balloon's target (live) and/or ``<currentMemory>`` (config)."""
        async with dom.job.acquire(Job.MODIFY, "setmem"):
            live, config = self._targets(dom, req)
            for what, d in (
                ("live", dom.definition if live else None),
                ("persistent", dom.persistent if config else None),
            ):
                if d is not None and req.size_kib > d.memory_kib:
                    raise VmferryError(
                        ErrorCode.INVALID_ARG,
                        f"cannot set memory of domain '{dom.name}' higher than its {what} "
                        f"maximum of {d.memory_kib} KiB (see setmaxmem)",
                    )
            if live:
                if dom.definition.devices.memballoon != "virtio":
                    raise VmferryError(
                        ErrorCode.OPERATION_INVALID,
                        f"cannot change the memory of running domain '{dom.name}' without a "
                        "balloon device (<memballoon model='virtio'/>)",
                    )
                mon = dom.require_monitor()
                await mon.execute("balloon", {"value": req.size_kib * 1024})
                dom.definition = dataclasses.replace(
                    dom.definition, current_memory_kib=req.size_kib
                )
                dom.save()
            if config:
                assert dom.persistent is not None
                self._persist(
                    dom, dataclasses.replace(dom.persistent, current_memory_kib=req.size_kib)
                )
        return dom

    def _targets(self, dom: QemuDomain, req: MemoryRequest) -> tuple[bool, bool]:
        """(live, config) as virsh's --live/--config/--current mean them."""
        live, config = req.live, req.config
        if not live and not config:  # --current
            live, config = dom.active, not dom.active
        if live and not dom.active:
            raise _invalid(f"domain '{dom.name}' is not running")
        if config and dom.persistent is None:
            raise _invalid(f"cannot change the persistent config of transient domain '{dom.name}'")
        return live, config

    def _persist(self, dom: QemuDomain, new: DomainDef) -> None:
        """Write the new persistent definition, then use it (persist before acting)."""
        self.driver.persist_definition(new)
        dom.persistent = new
        if not dom.active:
            dom.definition = new
