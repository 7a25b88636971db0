"""
``make bench-converge``: convergence policies against guests that outrun the link.

The test guest dirties memory at 0.25x, 0.5x, 1x, 2x and 4x the migration
bandwidth (a bandwidth cap, 32 MiB/s by default, makes the ratios hold), and is
migrated between two ``vmferryd`` under each policy: QEMU's defaults (``none``,
what libvirt does), Nova's time-based downtime ramp (``nova``), oVirt's
iteration ramp (``ovirt-minimal-downtime``) and vmferry's default (``vmferry``).
Every cell has the same contract: a downtime target and a deadline; a cell
that has not completed by its deadline is aborted by the engine (the guest
stays on the source).

Per cell: completed within the deadline or not, total time, downtime, guest
memory intact (the guest checks its own pages; the bench checks heartbeat
continuity after every cell, on whichever host the guest then runs). One guest
per ratio moves back and forth; before its cells the bench measures how fast it
really dirties (heartbeat page counters).

Usage::

    .venv/bin/python bench/converge_bench.py [--bandwidth 32] [--deadline 30]
        [--downtime-target 300] [--ratios 0.25,0.5,1,2,4] [--policies ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmferry.client import AsyncClient
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import migrate
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "converge.json"
POLICIES = ("none", "nova", "ovirt-minimal-downtime", "vmferry")
RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)
PAGE = 4096
MIB = 1 << 20


@dataclass
class Cell:
    """One migration: one ratio, one policy."""

    ratio: float
    policy: str
    completed: bool = False
    within_deadline: bool = False
    within_target: bool = False
    wall_s: float = 0.0
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    memory_intact: bool = False
    error: str = ""
    actions: list[dict[str, Any]] = field(default_factory=list)
    prediction: dict[str, Any] = field(default_factory=dict)


def measured_dirty_rate(host: Host, name: str, seconds: float = 3.0) -> float:
    """MiB/s the guest re-stamps, from two heartbeats *seconds* apart."""
    with host.client() as c:
        first = wait_heartbeat(c, name)
        time.sleep(seconds)
        last = wait_heartbeat(c, name, after=first)
    elapsed = (last.up_ms - first.up_ms) / 1000.0
    return (last.dirtied - first.dirtied) * PAGE / MIB / elapsed if elapsed > 0 else 0.0


async def _one(
    src: Host, dst: Host, name: str, params: MigrationParams
) -> tuple[dict[str, Any], dict[str, Any]]:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        report = await migrate(s, d, name, MigrateFlags.LIVE, params)
        # The policy's actions are in the source's completed job.
        source = (await s.run(mc.jobinfo(name, completed=True))).stats
    return report.stats, {"wall_s": report.wall_s, **source}


def run_cell(
    here: Host,
    there: Host,
    name: str,
    ratio: float,
    policy: str,
    args: argparse.Namespace,
    before: Heartbeat,
) -> tuple[Cell, Host, Heartbeat]:
    cell = Cell(ratio=ratio, policy=policy)
    params = MigrationParams(
        bandwidth_mib_s=args.bandwidth,
        policy=policy,
        downtime_target_ms=args.downtime_target,
        deadline_s=args.deadline,
    )
    started = time.monotonic()
    try:
        stats, source = asyncio.run(_one(here, there, name, params))
        cell.completed = True
        cell.wall_s = round(source["wall_s"], 2)
        cell.total_time_ms = _int(stats.get("total_time_ms"))
        cell.downtime_ms = _int(stats.get("downtime_ms"))
        cell.actions = list(source.get("policy_actions") or [])
        cell.prediction = {
            k: v for k, v in source.items() if k.startswith("policy_") and k != "policy_actions"
        }
        cell.within_deadline = cell.wall_s <= args.deadline
        cell.within_target = (
            cell.downtime_ms is not None and cell.downtime_ms <= args.downtime_target
        )
        now_on = there
    except VmferryError as err:
        cell.wall_s = round(time.monotonic() - started, 2)
        cell.error = err.message
        now_on = here
    with now_on.client() as c:
        after = wait_heartbeat(c, name, after=before)
    try:
        check_continuity(before, after)
        cell.memory_intact = True
    except AssertionError as err:
        cell.error = (cell.error + "; " if cell.error else "") + str(err)
    return cell, (there if now_on is there else here), after


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def table(cells: list[Cell], args: argparse.Namespace) -> str:
    lines = [
        f"bandwidth {args.bandwidth} MiB/s, downtime target {args.downtime_target} ms, "
        f"deadline {args.deadline:g} s",
        f"{'ratio':>5} {'dirty':>6}  {'policy':<23} {'done':<5} {'in time':<7} {'wall s':>7} "
        f"{'QEMU ms':>8} {'down ms':>8} {'memory':<7} actions",
    ]
    for c in cells:
        acts = ",".join(_action(a) for a in c.actions if a.get("reason") != "initial limit")
        lines.append(
            f"{c.ratio:>5g} {c.ratio * args.bandwidth:>6g}  {c.policy:<23} "
            f"{'yes' if c.completed else 'NO':<5} "
            f"{'yes' if c.within_deadline else 'NO':<7} {c.wall_s:>7.2f} "
            f"{c.total_time_ms if c.total_time_ms is not None else '-':>8} "
            f"{c.downtime_ms if c.downtime_ms is not None else '-':>8} "
            f"{'intact' if c.memory_intact else 'BAD':<7} {acts or c.error[:60]}"
        )
    return "\n".join(lines)


def _action(entry: dict[str, Any]) -> str:
    text = str(entry["action"])
    if "value" in entry:
        text += f"={entry['value']}"
    return text + ("(skipped)" if entry.get("skipped") else "")


def verdict(cells: list[Cell], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's target: vmferry completes every cell in time, within its target, fastest."""
    out: dict[str, Any] = {"cells": 0, "completed_in_time": 0, "within_target": 0, "fastest": 0}
    for ratio in sorted({c.ratio for c in cells}):
        row = [c for c in cells if c.ratio == ratio]
        mine = next((c for c in row if c.policy == "vmferry"), None)
        if mine is None:
            continue
        out["cells"] += 1
        out["completed_in_time"] += mine.completed and mine.within_deadline
        out["within_target"] += mine.within_target
        others = [c.wall_s for c in row if c.policy != "vmferry" and c.completed]
        out["fastest"] += mine.completed and all(mine.wall_s <= w for w in others)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=int, default=32, help="MiB/s cap")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds per cell")
    parser.add_argument("--downtime-target", type=int, default=300, help="ms")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--stamp-mib", type=int, default=32, help="the guest's working set")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    policies = args.policies.split(",")
    memory = max(128, args.stamp_mib * 9 // 8 + 64)
    cells: list[Cell] = []
    guests: list[dict[str, Any]] = []
    started = time.monotonic()
    with hosts(2) as (a, b):
        for ratio in ratios:
            name = f"c{str(ratio).replace('.', '_')}"
            dirty = ratio * args.bandwidth
            with a.client() as c:
                c.create(
                    guest_xml(name, memory_mib=memory, stamp_mib=args.stamp_mib, dirty_mib_s=dirty)
                )
                wait_heartbeat(c, name)
            rate = measured_dirty_rate(a, name)
            guests.append({"ratio": ratio, "asked_mib_s": dirty, "measured_mib_s": round(rate, 1)})
            print(
                f"ratio {ratio:g}: guest asked to dirty {dirty:g} MiB/s, measured {rate:.1f} MiB/s",
                flush=True,
            )
            here, there = a, b
            with here.client() as c:
                hb = wait_heartbeat(c, name)
            for policy in policies:
                cell, here, hb = run_cell(here, there, name, ratio, policy, args, hb)
                there = b if here is a else a
                cells.append(cell)
                print(table([cell], args).splitlines()[-1], flush=True)
            with here.client() as c:
                c.destroy(name)
    result = {
        "bandwidth_mib_s": args.bandwidth,
        "deadline_s": args.deadline,
        "downtime_target_ms": args.downtime_target,
        "guests": guests,
        "cells": [asdict(c) for c in cells],
        "vmferry": verdict(cells, args),
        "bench_s": round(time.monotonic() - started, 1),
    }
    print()
    print(table(cells, args))
    print(f"\nvmferry: {json.dumps(result['vmferry'])}; bench took {result['bench_s']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
