"""``domstats``: one domain's statistics under libvirt's names (``virConnectGetAllDomainStats``).

Groups, as virsh selects them: ``state``, ``cpu-total``, ``balloon``, ``vcpu``,
``interface``, ``block``, and vmferry's ``migration`` (the running outgoing migration,
from query-migrate).  Values are flat ``key: value`` pairs, e.g. ``block.0.rd.bytes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vmferry.errors import VmferryError
from vmferry.jobs import AsyncJob, Job
from vmferry.migration.stats import from_query_migrate
from vmferry.qemu.command import disk_device_id, is_q35
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.monitor import Monitor

GROUPS = ("state", "cpu-total", "balloon", "vcpu", "interface", "block", "migration")

_TICKS = os.sysconf("SC_CLK_TCK")
_NS = 1_000_000_000


def process_cpu_ns(pid: int) -> tuple[int, int] | None:
    """(user, system) CPU time of process *pid* in ns, from /proc (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return utime * _NS // _TICKS, stime * _NS // _TICKS


async def domain_stats(dom: QemuDomain, groups: frozenset[str]) -> dict[str, Any]:
    """The statistics of *dom* in *groups*; a domain not running has only what its XML says."""
    stats: dict[str, Any] = {}
    d = dom.definition
    if "state" in groups:
        stats["state.state"] = str(dom.state)
        stats["state.reason"] = dom.reason
    if "vcpu" in groups:
        stats["vcpu.current"] = d.vcpus
        stats["vcpu.maximum"] = d.vcpus
    if "balloon" in groups:
        stats["balloon.maximum"] = d.memory_kib
        stats["balloon.current"] = d.current_memory_kib
        stats["balloon.target"] = d.current_memory_kib
    if "interface" in groups:
        stats["net.count"] = len(d.devices.interfaces)
        for i, nic in enumerate(d.devices.interfaces):
            # user-mode networking has no host device whose counters could be read
            stats[f"net.{i}.name"] = f"hostnet{i}"
            stats[f"net.{i}.mac"] = nic.mac
    # QEMU cannot answer during an incoming migration: the job model says so.
    if not dom.active or dom.monitor is None or not dom.job.allowed(Job.QUERY):
        return stats
    async with dom.job.acquire(Job.QUERY, "domstats"):
        mon = dom.monitor
        if mon is None or not mon.connected:
            return stats
        if "cpu-total" in groups and dom.process is not None:
            cpu = process_cpu_ns(dom.process.pid)
            if cpu is not None:
                stats["cpu.time"] = cpu[0] + cpu[1]
                stats["cpu.user"], stats["cpu.system"] = cpu
        if "balloon" in groups and d.devices.memballoon == "virtio":
            actual = await _query(mon, "query-balloon")
            if isinstance(actual, dict) and "actual" in actual:
                stats["balloon.current"] = int(actual["actual"]) // 1024
        if "block" in groups:
            stats.update(await _block_stats(dom, mon))
        if "migration" in groups and dom.job.async_job == AsyncJob.MIGRATION_OUT:
            info = await _query(mon, "query-migrate")
            if isinstance(info, dict):
                for key, value in from_query_migrate(info, started=dom.migration.started).items():
                    stats[f"migration.{key}"] = value
    return stats


async def _query(mon: Monitor, cmd: str) -> Any:
    """*cmd*'s answer, or None if QEMU refuses it (a statistic is missing, not the call)."""
    try:
        return await mon.execute(cmd)
    except VmferryError:
        return None


async def _block_stats(dom: QemuDomain, mon: Monitor) -> dict[str, Any]:
    disks = dom.definition.devices.disks
    stats: dict[str, Any] = {"block.count": len(disks)}
    answer = await _query(mon, "query-blockstats")
    by_qdev: dict[str, dict[str, Any]] = {}
    for entry in answer if isinstance(answer, list) else []:
        qdev = str(entry.get("qdev", ""))
        # "/machine/peripheral/virtio-disk0/virtio-backend" or "ide0-0-0"
        parts = [p for p in qdev.split("/") if p]
        key = parts[2] if len(parts) > 2 and parts[1] == "peripheral" else qdev
        by_qdev[key] = entry.get("stats", {}) or {}
    q35 = is_q35(dom.definition.os.machine)
    for i, disk in enumerate(disks):
        prefix = f"block.{i}"
        stats[f"{prefix}.name"] = disk.target_dev
        if disk.source_file:
            stats[f"{prefix}.path"] = disk.source_file
        s = by_qdev.get(disk_device_id(disk, q35=q35))
        if s is None:
            continue
        for qemu_key, key in (
            ("rd_operations", "rd.reqs"),
            ("rd_bytes", "rd.bytes"),
            ("rd_total_time_ns", "rd.times"),
            ("wr_operations", "wr.reqs"),
            ("wr_bytes", "wr.bytes"),
            ("wr_total_time_ns", "wr.times"),
            ("flush_operations", "fl.reqs"),
            ("flush_total_time_ns", "fl.times"),
        ):
            if qemu_key in s:
                stats[f"{prefix}.{key}"] = int(s[qemu_key])
    return stats
