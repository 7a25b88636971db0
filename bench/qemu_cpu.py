"""
CPU time the QEMU processes of a migration spend, per thread name, sampled from /proc.

Used by ``bench/stream_bench.py``: throughput on a machine shared with others
swings with their load, while the CPU time a migration costs per MiB does not
(much). The sampler polls ``/proc/PID/task/TID/stat`` of every QEMU the given
hosts run, every 50 ms while the hop runs, and keeps each thread's last
figure, so a source QEMU that exits at the end still counts up to its last
sample (at most 50 ms of it lost). vCPU threads (``CPU n/TCG``) are left out:
they run the guest, and do so for as long as the hop lasts, whatever it costs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[tuple[int, str], int]:
    """(tid, thread name) -> user + system clock ticks, for one process (empty once gone)."""
    out: dict[tuple[int, str], int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[(int(tid), name)] = int(fields[11]) + int(fields[12])  # utime, stime
    return out


class QemuCpu:
    """``with QemuCpu(pids) as cpu: ...`` then ``cpu.by_thread`` (ms per thread name)."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.05) -> None:
        self._pids = pids
        self._interval = interval
        self._first: dict[tuple[int, str], int] = {}
        self._last: dict[tuple[int, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, pids: list[int]) -> None:
        for pid in pids:
            for key, ticks in _threads(pid).items():
                self._first.setdefault(key, ticks)
                self._last[key] = ticks

    def _run(self) -> None:
        pids = self._pids()
        rounds = 0
        while not self._stop.is_set():
            if rounds % 4 == 0:  # a new QEMU (the destination's) is found within 0.2 s
                pids = sorted(set(pids) | set(self._pids()))
            self._sample(pids)
            rounds += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> QemuCpu:
        self._sample(self._pids())
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def by_thread(self) -> dict[str, float]:
        """Milliseconds of CPU per thread name (both QEMUs summed), vCPU threads left out."""
        out: dict[str, float] = {}
        for (tid, name), ticks in self._last.items():
            if "/TCG" in name or "/KVM" in name:
                continue
            out[name] = out.get(name, 0.0) + (ticks - self._first[(tid, name)]) * TICK_MS
        return {name: ms for name, ms in sorted(out.items()) if ms > 0}
