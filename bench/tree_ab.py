"""
Two source trees' ``vmferry migrate`` side by side in one run: a before/after of a change.

Each tree runs its own two ``vmferryd`` (unix sockets) and its own CLI; each
migrates its own guest (the ``make bench`` guest: 192 MiB, 64 MiB stamped,
dirtying 16 MiB/s) back and forth as ``vmferry -c SRC migrate --live NAME DEST
--json`` processes. Hops alternate between the trees (A B B A ...), so the
machine's load hits both alike; after every hop the bench waits for the
guest's next heartbeat and checks it continues the last one (same boot, no bad
pages), as ``migrate_bench.py`` does. There is no bare-QEMU arm: the figures
to quote are the ratios of the two trees, per step and per hop.

Usage (e.g. main's tree against this one)::

    mkdir -p /tmp/main-tree && git archive main src policies | tar -x -C /tmp/main-tree
    .venv/bin/python bench/tree_ab.py /tmp/main-tree [--hops 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from vmferry.client import AsyncClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from migrate_bench import (
    REPO,
    STEPS,
    GuestShape,
    VmferryPath,
    _workdir,
    daemon,
    log,
    start_daemon,
    stop_daemon,
    vmferry_argv,
)

DEFAULT_JSON = REPO / "build" / "bench" / "tree_ab.json"


def _tree_argv(tree: Path) -> list[str]:
    """The CLI run from *tree*'s sources (``env`` sets PYTHONPATH after cli_env())."""
    return ["env", f"PYTHONPATH={tree / 'src'}", *vmferry_argv()]


async def run(trees: dict[str, Path], hops: int, shape: GuestShape) -> dict[str, Any]:
    base = random.randrange(40000, 48000, 64)
    paths: dict[str, VmferryPath] = {}
    async with contextlib.AsyncExitStack() as stack:
        work = stack.enter_context(_workdir(False))
        for i, (arm, tree) in enumerate(trees.items()):
            hosts = [
                daemon(work / f"{arm}{j}", f"{arm}{j}", base + 16 * (2 * i + j), "warning", None)
                for j in range(2)
            ]
            for host in hosts:
                host.extra_env["PYTHONPATH"] = str(tree / "src")  # the tree's daemons
                stack.push_async_callback(stop_daemon, host)
            await asyncio.gather(*(start_daemon(h) for h in hosts))
            clients = [await stack.enter_async_context(AsyncClient(h.uri)) for h in hosts]
            path = VmferryPath((clients[0], clients[1]), f"ab{arm}", False, _tree_argv(tree))
            stack.push_async_callback(path.destroy)
            paths[arm] = path
        log("booting the guests")
        await asyncio.gather(*(p.boot_guest(shape, 60) for p in paths.values()))
        arms = list(paths)
        for i in range(hops):
            for arm in arms if i % 2 == 0 else arms[::-1]:
                path = paths[arm]
                await path.hop([path.hosts[0].uri, path.hosts[1].uri])
                await path.verify()
                log(f"hop {i + 1:2}/{hops} {arm:>8} {path.hops[-1]['wall_s'] * 1000:7.1f} ms")
    return {arm: p.hops for arm, p in paths.items()}


def medians(hops: list[dict[str, Any]]) -> dict[str, float]:
    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000

    out = {"process": med([h["wall_s"] for h in hops])}
    out["migration (its wall_s)"] = med([h["report_wall_s"] for h in hops])
    out["process - migration"] = out["process"] - out["migration (its wall_s)"]
    for step in STEPS:
        out[step] = med([h["steps_s"].get(step, 0.0) for h in hops])
    out["begin+finish+confirm"] = med(
        [sum(h["steps_s"].get(s, 0.0) for s in ("begin", "finish", "confirm")) for h in hops]
    )
    out["sessions, probe (other)"] = med([h["other_s"] for h in hops])
    out["QEMU total_time"] = statistics.median(h["qemu_total_ms"] for h in hops)
    out["process - QEMU total_time"] = med([h["wall_s"] - h["qemu_total_ms"] / 1000 for h in hops])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("before", type=Path, help="the other tree (its src/ and policies/)")
    ap.add_argument("--after", type=Path, default=REPO, help="default: this tree")
    ap.add_argument("--hops", type=int, default=10, help="migrations per tree (default 10)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    result = asyncio.run(run(trees, args.hops, GuestShape()))
    table = {arm: medians(hops) for arm, hops in result.items()}
    print(
        f"\nmedian ms per hop ({args.hops} hops each, alternating)  before    after  after/before"
    )
    for key in table["before"]:
        b, a = table["before"][key], table["after"][key]
        print(f"  {key:<40}{b:8.1f} {a:8.1f}   {a / b if b else float('nan'):6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
