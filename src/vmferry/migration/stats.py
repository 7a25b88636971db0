"""Migration statistics: QEMU's query-migrate turned into domjobinfo fields."""

from __future__ import annotations

import math
import time
from typing import Any

from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import MigrationStatus


def from_query_migrate(info: dict[str, Any], *, started: float) -> dict[str, Any]:
    """Map a ``query-migrate`` answer to libvirt's job statistics names."""
    ram = info.get("ram", {}) or {}
    stats: dict[str, Any] = {
        "status": MigrationStatus.of(info).value,
        "time_elapsed_ms": int((time.time() - started) * 1000) if started else 0,
        "data_total": int(ram.get("total", 0)),
        "data_processed": int(ram.get("transferred", 0)),
        "data_remaining": int(ram.get("remaining", 0)),
        "memory_bps": int(float(ram.get("mbps", 0.0)) * 1e6 / 8),
        "memory_dirty_rate": int(ram.get("dirty-pages-rate", 0)),
        "memory_page_size": int(ram.get("page-size", 4096)),
        "memory_iteration": int(ram.get("dirty-sync-count", 0)),
        "memory_normal_bytes": int(ram.get("normal-bytes", 0)),
    }
    for qemu_key, key in (
        ("total-time", "total_time_ms"),
        ("setup-time", "setup_time_ms"),
        ("downtime", "downtime_ms"),
        ("expected-downtime", "expected_downtime_ms"),
        ("cpu-throttle-percentage", "auto_converge_throttle"),
    ):
        if qemu_key in info:
            stats[key] = int(info[qemu_key])
    if info.get("error-desc"):
        stats["error"] = str(info["error-desc"])
    return stats


def completed_stats(
    dom: QemuDomain, remote: dict[str, int], *, arrived: float | None = None
) -> dict[str, Any]:
    """Statistics of a finished migration, as ``domjobinfo --completed`` shows them.

    *remote*: the destination's Finish cookie figures; *arrived*: when its
    reply reached this host (Confirm), which gives ``guest_downtime_ms``.
    """
    stats = dict(dom.migration.stats)
    stats["status"] = MigrationStatus.COMPLETED.value
    if dom.migration.started:
        stats["time_elapsed_ms"] = int((time.time() - dom.migration.started) * 1000)
    if "downtime" in remote:
        stats["downtime_ms"] = int(remote["downtime"])
    guest = guest_downtime_ms(dom.migration.stopped, arrived, remote.get("resumed_ago"))
    if guest is not None:
        stats["guest_downtime_ms"] = guest
    return stats


def guest_downtime_ms(
    stopped: float, arrived: float | None, resumed_ago_ms: int | None
) -> int | None:
    """
    The guest-visible downtime: stopped here, running there, each read on one clock.

    From the STOP event (*stopped*, this host's clock) to the arrival of the
    Finish reply (*arrived*, this host's clock), less the time the destination
    says passed between the guest resuming and its reply (*resumed_ago_ms*, its
    clock). The reply's way back (and a client's relay of it) cannot be known
    and stays in: an upper bound, never an understatement. None when a figure
    is missing (protocol v2, a guest left paused, a lost reply).
    """
    if not stopped or arrived is None or resumed_ago_ms is None:
        return None
    return max(0, round((arrived - stopped) * 1000) - int(resumed_ago_ms))


#: vmferry's job statistics that travel in the cookie, with libvirt's cookie names.
COOKIE_NAMES = {
    "time_elapsed_ms": "time_elapsed",
    "downtime_ms": "downtime",
    "setup_time_ms": "setup_time",
    "data_total": "memory_total",  # vmferry's data_* is memory (and disk_* with storage)
    "data_processed": "memory_processed",
    "data_remaining": "memory_remaining",
    "memory_bps": "memory_bps",
    "memory_dirty_rate": "memory_dirty_rate",
    "memory_page_size": "memory_page_size",
    "memory_iteration": "memory_iteration",
    "memory_normal_bytes": "memory_normal_bytes",
    "auto_converge_throttle": "auto_converge_throttle",
    "disk_total": "disk_total",  # storage migration (then data_* is memory and disk)
    "disk_processed": "disk_processed",
    "disk_remaining": "disk_remaining",
}


def to_cookie(stats: dict[str, Any]) -> dict[str, int]:
    """The figures of *stats* (domjobinfo names) under libvirt's cookie names."""
    out = {}
    for key, name in COOKIE_NAMES.items():
        value = stats.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = max(0, int(value))
    return out


def from_cookie(stats: dict[str, int]) -> dict[str, int]:
    """The cookie's figures back under domjobinfo names."""
    return {key: stats[name] for key, name in COOKIE_NAMES.items() if name in stats}
