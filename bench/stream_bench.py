"""
``make bench-stream``: what encrypting and tunnelling the migration stream costs.

Two ``vmferryd`` with one PKI (mutual TLS between them) move one test guest
back and forth. Side by side, in one run, hops alternate between

* **plain** vs **tls**: client-managed v3, ``--live`` vs ``--live --tls``
  (QEMU's TLS with the cluster certificates), each as a user gets it by
  default: ``--tls`` runs over the daemons' ``[migration] tls_channels``
  multifd channels (2; ``--tls-channels`` sets them, 0 = one TLS stream);
* ``--only multifd``: plain, tls, **plain+mfd** and **tls+mfd** (the client's
  ``--parallel CHANNELS``), each over plain;
* **direct** vs **tunnelled**: peer-to-peer over the daemons' TLS
  connection, ``--p2p`` vs ``--p2p --tunnelled`` (the stream relayed by the
  daemons inside that connection).

Within each pair the order alternates every round, so whatever else the
machine does hits both alike. The figure compared is QEMU's own throughput,
bytes of memory sent over the migration's ``total_time``; the wall time of
the hop is reported too, and so is the CPU time both QEMUs spent on it (every
thread but the vCPUs', sampled from /proc by ``bench/qemu_cpu.py``) per MiB
sent: unlike throughput, that figure hardly moves with the machine's load, and
it shows where an encrypted stream's time goes; the two daemons' CPU per MiB
is reported beside it (a tunnelled stream's relays run there). After every hop
the guest's memory is checked (its heartbeat continues the source's); a
corrupted guest fails the bench.

Targets (issue 8): tls/plain >= 0.7, tunnelled/direct >= 0.8.

``run_stream_bench`` is the reusable part (``make bench-storage`` calls it).

Usage::

    .venv/bin/python bench/stream_bench.py [--rounds 4] [--memory 512 --stamp 256] [--json PATH]
        [--only tls|tunnel|multifd] [--channels 2] [--tls-channels N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu_cpu import QemuCpu  # bench/, beside this file
from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.pki import init_pki
from vmferry.testguest import Heartbeat, check_continuity
from vmferry.testing import Host, hosts, wait_heartbeat

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "stream.json"
TARGETS = {"tls/plain": 0.7, "tunnelled/direct": 0.8}

LIVE = MigrateFlags.LIVE
P2P = LIVE | MigrateFlags.PEER2PEER
PARALLEL = LIVE | MigrateFlags.PARALLEL
#: mode -> (flags, peer-to-peer); "+mfd" modes add --parallel CHANNELS (multifd)
MODES: dict[str, tuple[MigrateFlags, bool]] = {
    "plain": (LIVE, False),
    "tls": (LIVE | MigrateFlags.TLS, False),
    "plain+mfd": (PARALLEL, False),
    "tls+mfd": (PARALLEL | MigrateFlags.TLS, False),
    "direct": (P2P, True),
    "tunnelled": (P2P | MigrateFlags.TUNNELLED, True),
}
#: Each group alternates its order every round; ratios are each mode over the group's first.
PAIRS: tuple[tuple[str, ...], ...] = (("plain", "tls"), ("direct", "tunnelled"))
#: ``--only multifd``: the four arms of the TLS question side by side.
MULTIFD = ("plain", "tls", "plain+mfd", "tls+mfd")
CHANNELS = 2


@dataclass
class Hop:
    mode: str
    wall_s: float
    bytes: int
    qemu_ms: int
    cpu_ms: dict[str, float]  # QEMU threads (both sides, vCPUs left out) -> CPU ms
    daemon_ms: dict[str, float]  # "src"/"dst" daemon -> CPU ms (the tunnel's relays run there)
    round: int = 0  # the round it ran in: the paired ratios compare hops of one round

    @property
    def cpu_ms_mib(self) -> float:
        return sum(self.cpu_ms.values()) / max(self.bytes / (1 << 20), 1.0)

    @property
    def daemon_ms_mib(self) -> float:
        return sum(self.daemon_ms.values()) / max(self.bytes / (1 << 20), 1.0)

    @property
    def mib_s(self) -> float:
        return self.bytes / (1 << 20) / max(self.qemu_ms / 1000, 1e-3)


async def _hop(src: Host, dst: Host, name: str, mode: str, channels: int) -> Hop:
    flags, p2p = MODES[mode]
    params = MigrationParams(parallel_connections=channels if flags & MigrateFlags.PARALLEL else 0)
    started = time.perf_counter()
    sampler = QemuCpu(lambda: src.qemu_pids() + dst.qemu_pids())
    daemons = {role: QemuCpu(_pid_of(host)) for role, host in (("src", src), ("dst", dst))}
    with sampler, daemons["src"], daemons["dst"]:
        report = await _migrate(src, dst, name, flags, p2p, params)
    wall = time.perf_counter() - started
    stats = report.stats
    return Hop(
        mode,
        wall,
        int(stats.get("data_processed", 0)),
        int(stats.get("total_time_ms", 0)),
        sampler.by_thread,
        {role: sum(cpu.by_thread.values()) for role, cpu in daemons.items()},
    )


def _pid_of(host: Host) -> Callable[[], list[int]]:
    return lambda: [host.proc.pid] if host.proc is not None else []


async def _migrate(
    src: Host, dst: Host, name: str, flags: MigrateFlags, p2p: bool, params: MigrationParams
) -> MigrationReport:
    async with AsyncClient(src.uri) as s:
        report: MigrationReport
        if p2p:
            report = await migrate_p2p(s, dst.tls_uri, name, flags, params)
        else:
            async with AsyncClient(dst.uri) as d:
                report = await migrate(s, d, name, flags, params)
    return report


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
    pairs: tuple[tuple[str, ...], ...] = PAIRS,
    channels: int = CHANNELS,
    tls_channels: int | None = None,
) -> dict[str, Any]:
    """Alternate the modes of each group (plain/tls, direct/tunnelled); medians and ratios.

    :param tls_channels: the daemons' ``[migration] tls_channels`` (None: their default).
    """
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    hops: list[Hop] = []
    config = f"tls_channels = {tls_channels}\n" if tls_channels is not None else ""
    with hosts(2, pki_dir=pki, extra_config=config) as (a, b):
        name = "streambench"
        hb = a.boot_guest(name, memory_mib=memory_mib, stamp_mib=stamp_mib, dirty_mib_s=dirty_mib_s)
        here, there = a, b
        for i in range(rounds):
            for pair in pairs:
                for mode in pair if i % 2 == 0 else tuple(reversed(pair)):
                    hop = asyncio.run(_hop(here, there, name, mode, channels))
                    hop.round = i
                    hb = _checked(there, name, hb)
                    hops.append(hop)
                    print(
                        f"  {mode:10} {hop.wall_s:6.2f} s wall  {hop.mib_s:7.1f} MiB/s "
                        f"({hop.bytes >> 20} MiB in {hop.qemu_ms} ms) "
                        f"QEMU CPU {hop.cpu_ms_mib:.2f} ms/MiB, daemons {hop.daemon_ms_mib:.2f}",
                        flush=True,
                    )
                    here, there = there, here
    result: dict[str, Any] = {
        "modes": {},
        "ratios": {},
        "hops": [
            {
                **h.__dict__,
                "mib_s": h.mib_s,
                "cpu_ms_mib": h.cpu_ms_mib,
                "daemon_ms_mib": h.daemon_ms_mib,
            }
            for h in hops
        ],
    }
    for mode in [m for pair in pairs for m in pair]:
        mine = [h for h in hops if h.mode == mode]
        result["modes"][mode] = {
            "mib_s": statistics.median(h.mib_s for h in mine),
            "wall_s": statistics.median(h.wall_s for h in mine),
            "cpu_ms_mib": statistics.median(h.cpu_ms_mib for h in mine),
            "daemon_ms_mib": statistics.median(h.daemon_ms_mib for h in mine),
            # per thread name, the median hop's (by CPU per MiB)
            "cpu_ms": sorted(mine, key=lambda h: h.cpu_ms_mib)[len(mine) // 2].cpu_ms,
            "hops": len(mine),
        }
    result["paired"] = {}
    for first, *others in pairs:
        for other in others:
            ratio = result["modes"][other]["mib_s"] / result["modes"][first]["mib_s"]
            result["ratios"][f"{other}/{first}"] = ratio
            result["paired"][f"{other}/{first}"] = paired_ratios(hops, first, other)
    if {"plain+mfd", "tls+mfd"} <= result["modes"].keys():
        # like for like: the same multifd channels, TLS the only difference
        ratio = result["modes"]["tls+mfd"]["mib_s"] / result["modes"]["plain+mfd"]["mib_s"]
        result["ratios"]["tls+mfd/plain+mfd"] = ratio
        result["paired"]["tls+mfd/plain+mfd"] = paired_ratios(hops, "plain+mfd", "tls+mfd")
    return result


def paired_ratios(hops: list[Hop], first: str, other: str) -> list[float]:
    """*other*'s throughput over *first*'s, one ratio per round (their hops ran back to back).

    The machine's load drifts between rounds (plain swings 548-703 MiB/s on a quiet one);
    two hops of one round see about the same load, so their ratio moves less than either.
    """
    out = []
    for i in sorted({h.round for h in hops}):
        a = [h.mib_s for h in hops if h.round == i and h.mode == first]
        b = [h.mib_s for h in hops if h.round == i and h.mode == other]
        if a and b:
            out.append(statistics.median(b) / statistics.median(a))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="hops of each mode (default 4)")
    ap.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    ap.add_argument("--stamp", type=int, default=256, help="guest memory filled with data, MiB")
    ap.add_argument(
        "--only",
        choices=("tls", "tunnel", "multifd"),
        help="one pair only; multifd: plain, tls, plain+mfd, tls+mfd side by side",
    )
    ap.add_argument(
        "--channels", type=int, default=CHANNELS, help="multifd channels of the +mfd modes"
    )
    ap.add_argument(
        "--tls-channels",
        type=int,
        help="the daemons' [migration] tls_channels (default: theirs; 0: one TLS stream)",
    )
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    print(f"stream bench: {args.rounds} rounds, guest {args.memory} MiB ({args.stamp} stamped)")
    groups = {"tls": (PAIRS[0],), "tunnel": (PAIRS[1],), "multifd": (MULTIFD,)}
    pairs = groups[args.only] if args.only else PAIRS
    result = run_stream_bench(
        args.rounds,
        memory_mib=args.memory,
        stamp_mib=args.stamp,
        pairs=pairs,
        channels=args.channels,
        tls_channels=args.tls_channels,
    )
    print("\nmode        median MiB/s   median wall s   QEMU CPU ms/MiB   daemons CPU ms/MiB")
    for mode, fig in result["modes"].items():
        print(
            f"  {mode:10} {fig['mib_s']:10.1f} {fig['wall_s']:12.2f} {fig['cpu_ms_mib']:14.2f}"
            f" {fig['daemon_ms_mib']:18.2f}"
        )
        threads = ", ".join(f"{n} {ms:.0f}" for n, ms in fig["cpu_ms"].items() if ms >= 20)
        print(f"{'':14}CPU ms by thread (median hop): {threads}")
    missed = []
    for key, ratio in result["ratios"].items():
        rounds = result["paired"][key]
        paired = (
            f"  per round {' '.join(f'{r:.2f}' for r in rounds)}"
            f" (median {statistics.median(rounds):.2f})"
            if rounds
            else ""
        )
        if key not in TARGETS:
            print(f"{key:17} {ratio:5.2f}{paired}")
            continue
        ok = ratio >= TARGETS[key]
        missed += [] if ok else [key]
        verdict = f"(target >= {TARGETS[key]}) {'ok' if ok else 'MISSED'}"
        print(f"{key:17} {ratio:5.2f}  {verdict}{paired}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")
    return 1 if missed and args.enforce else 0


if __name__ == "__main__":
    sys.exit(main())
