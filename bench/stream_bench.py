"""
``make bench-stream``: what encrypting and tunnelling the migration stream costs.

Two ``vmferryd`` with one PKI (mutual TLS between them) move one test guest
back and forth. Side by side, in one run, hops alternate between

* **plain** vs **tls**: client-managed v3, ``--live`` vs ``--live --tls``
  (QEMU's TLS with the cluster certificates);
* **direct** vs **tunnelled**: peer-to-peer over the daemons' TLS
  connection, ``--p2p`` vs ``--p2p --tunnelled`` (the stream relayed by the
  daemons inside that connection).

Within each pair the order alternates every round, so whatever else the
machine does hits both alike. The figure compared is QEMU's own throughput,
bytes of memory sent over the migration's ``total_time``; the wall time of
the hop is reported too. After every hop the guest's memory is checked (its
heartbeat continues the source's); a corrupted guest fails the bench.

Targets (issue 8): tls/plain >= 0.7, tunnelled/direct >= 0.8.

``--cpu`` also prints, per hop and as medians per mode, the CPU seconds per GiB
sent of each daemon and each QEMU (:class:`CpuSampler`, ``/proc/PID/stat``): where
the time of a tunnelled hop goes. It does not change what is compared.

``run_stream_bench`` is the reusable part (``make bench-storage`` calls it).

Usage::

    .venv/bin/python bench/stream_bench.py [--rounds 4] [--memory 512 --stamp 256] [--cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.migration.flags import MigrateFlags
from vmferry.pki import init_pki
from vmferry.testguest import Heartbeat, check_continuity
from vmferry.testing import Host, hosts, wait_heartbeat

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "stream.json"
TARGETS = {"tls/plain": 0.7, "tunnelled/direct": 0.8}

LIVE = MigrateFlags.LIVE
P2P = LIVE | MigrateFlags.PEER2PEER
#: mode -> (flags, peer-to-peer)
MODES: dict[str, tuple[MigrateFlags, bool]] = {
    "plain": (LIVE, False),
    "tls": (LIVE | MigrateFlags.TLS, False),
    "direct": (P2P, True),
    "tunnelled": (P2P | MigrateFlags.TUNNELLED, True),
}
PAIRS = (("plain", "tls"), ("direct", "tunnelled"))


@dataclass
class Hop:
    mode: str
    wall_s: float
    bytes: int
    qemu_ms: int
    #: --cpu: CPU seconds of each process during the hop (src/dst QEMU and daemon).
    cpu_s: dict[str, float] | None = None

    @property
    def mib_s(self) -> float:
        return self.bytes / (1 << 20) / max(self.qemu_ms / 1000, 1e-3)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float | None:
    """User + system CPU seconds of *pid*, all its threads (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class CpuSampler:
    """
    The CPU each process of a hop uses: both daemons, the source QEMU and the
    destination QEMU (it appears during the hop; the source's exits at its end, so
    it is sampled every :attr:`period` and its last sample counts: up to one
    period of its CPU may be missed).
    """

    period = 0.1

    def __init__(self, src: Host, dst: Host) -> None:
        assert src.proc is not None and dst.proc is not None
        self._roles = {src.proc.pid: "src daemon", dst.proc.pid: "dst daemon"}
        self._roles.update({pid: "src qemu" for pid in src.qemu_pids()})
        self._dst = dst
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in self._dst.qemu_pids():
            self._roles.setdefault(pid, "dst qemu")
        for pid in self._roles:
            cpu = _cpu_of(pid)
            if cpu is not None:
                start = 0.0 if self._roles[pid] == "dst qemu" else cpu  # a new process
                self._first.setdefault(pid, start)
                self._last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, role in self._roles.items():
            if pid in self._last:
                out[role] = out.get(role, 0.0) + self._last[pid] - self._first[pid]
        return out


async def _hop(src: Host, dst: Host, name: str, mode: str) -> Hop:
    flags, p2p = MODES[mode]
    started = time.perf_counter()
    async with AsyncClient(src.uri) as s:
        report: MigrationReport
        if p2p:
            report = await migrate_p2p(s, dst.tls_uri, name, flags)
        else:
            async with AsyncClient(dst.uri) as d:
                report = await migrate(s, d, name, flags)
    wall = time.perf_counter() - started
    stats = report.stats
    return Hop(mode, wall, int(stats.get("data_processed", 0)), int(stats.get("total_time_ms", 0)))


def _checked(host: Host, name: str, before: Heartbeat) -> Heartbeat:
    with host.client() as c:
        after = wait_heartbeat(c, name, after=before, timeout=60)
    check_continuity(before, after)  # raises on a corrupted or rebooted guest
    return after


def run_stream_bench(
    rounds: int = 4,
    *,
    memory_mib: int = 512,
    stamp_mib: int = 256,
    dirty_mib_s: float = 4,
    pairs: tuple[tuple[str, str], ...] = PAIRS,
    cpu: bool = False,
) -> dict[str, Any]:
    """Alternate plain/tls and direct/tunnelled hops; per-mode medians and the ratios."""
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    hops: list[Hop] = []
    with hosts(2, pki_dir=pki) as (a, b):
        name = "streambench"
        hb = a.boot_guest(name, memory_mib=memory_mib, stamp_mib=stamp_mib, dirty_mib_s=dirty_mib_s)
        here, there = a, b
        for i in range(rounds):
            for pair in pairs:
                for mode in pair if i % 2 == 0 else tuple(reversed(pair)):
                    if cpu:
                        with CpuSampler(here, there) as sampler:
                            hop = asyncio.run(_hop(here, there, name, mode))
                        hop.cpu_s = sampler.seconds()
                    else:
                        hop = asyncio.run(_hop(here, there, name, mode))
                    hb = _checked(there, name, hb)
                    hops.append(hop)
                    print(
                        f"  {mode:10} {hop.wall_s:6.2f} s wall  {hop.mib_s:7.1f} MiB/s "
                        f"({hop.bytes >> 20} MiB in {hop.qemu_ms} ms)",
                        flush=True,
                    )
                    if hop.cpu_s is not None:
                        print(f"             CPU s/GiB: {_per_gib(hop)}", flush=True)
                    here, there = there, here
    result: dict[str, Any] = {"modes": {}, "ratios": {}, "hops": [h.__dict__ for h in hops]}
    for mode in [m for pair in pairs for m in pair]:
        mine = [h for h in hops if h.mode == mode]
        result["modes"][mode] = {
            "mib_s": statistics.median(h.mib_s for h in mine),
            "wall_s": statistics.median(h.wall_s for h in mine),
            "hops": len(mine),
        }
        if cpu:
            roles = sorted({r for h in mine for r in h.cpu_s or {}})
            result["modes"][mode]["cpu_s_per_gib"] = {
                r: statistics.median((h.cpu_s or {}).get(r, 0.0) / _gib(h) for h in mine)
                for r in roles
            }
    for fast, slow in pairs:
        ratio = result["modes"][slow]["mib_s"] / result["modes"][fast]["mib_s"]
        result["ratios"][f"{slow}/{fast}"] = ratio
    return result


def _gib(hop: Hop) -> float:
    return max(hop.bytes, 1) / (1 << 30)


def _per_gib(hop: Hop) -> str:
    return "  ".join(f"{r} {c / _gib(hop):.2f}" for r, c in sorted((hop.cpu_s or {}).items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="hops of each mode (default 4)")
    ap.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    ap.add_argument("--stamp", type=int, default=256, help="guest memory filled with data, MiB")
    ap.add_argument("--only", choices=("tls", "tunnel"), help="one pair only")
    ap.add_argument(
        "--cpu", action="store_true", help="CPU s per GiB sent of each QEMU and daemon, per hop"
    )
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    print(f"stream bench: {args.rounds} rounds, guest {args.memory} MiB ({args.stamp} stamped)")
    pairs = PAIRS if not args.only else (PAIRS[0],) if args.only == "tls" else (PAIRS[1],)
    result = run_stream_bench(
        args.rounds, memory_mib=args.memory, stamp_mib=args.stamp, pairs=pairs, cpu=args.cpu
    )
    print("\nmode        median MiB/s   median wall s")
    for mode, fig in result["modes"].items():
        print(f"  {mode:10} {fig['mib_s']:10.1f} {fig['wall_s']:12.2f}")
        for role, per_gib in fig.get("cpu_s_per_gib", {}).items():
            print(f"      {role:11} {per_gib:5.2f} CPU s/GiB")
    missed = []
    for key, ratio in result["ratios"].items():
        ok = ratio >= TARGETS[key]
        missed += [] if ok else [key]
        print(f"{key:17} {ratio:5.2f}  (target >= {TARGETS[key]}) {'ok' if ok else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")
    return 1 if missed and args.enforce else 0


if __name__ == "__main__":
    sys.exit(main())
