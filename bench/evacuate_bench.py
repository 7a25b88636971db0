"""
``make bench-evacuate``: draining a host under four evacuation policies, side by side.

Eight test guests with mixed dirty rates run on host A and are evacuated to B
and C (three ``vmferryd`` with a lockspace cluster). The links A->B and A->C
are emulated by migration bandwidth caps (``--link`` MiB/s each), the same for
every policy; a migration that sets up or finishes (no memory moving) takes
none of its link, as on a real link:

- ``vmferry``: ``vmferry evacuate`` (the planner, the drain in A's daemon,
  ``--max-parallel 6 --per-destination 3``). Its drain lets one migration send
  per link, capped at the whole link, the next two set up and waiting
  (:mod:`vmferry.migration.linkshare`); a sender hands its link over when
  QEMU's stream is over;
- ``nova``: one migration at a time (``max_concurrent_live_migrations = 1``);
- ``kubevirt``: its defaults, 5 per cluster and 2 outbound per node (so 2 at once);
- ``naive``: all eight at once.

The baselines place guests round-robin on B and C (the placement a scheduler
blind to the link makes on equal hosts) and start them in boot order. Their
links are shared as TCP shares a link: every ``LINK_POLL_S`` the bench looks
(``domjobinfo``) at which of a link's migrations send, and caps each of the
*k* sending at ``link / k`` (``migrate-set-speed``); a migration starts capped
at its share with those sending then. Between two looks a link may carry more
than its bandwidth: that error favours the baselines. For every policy, a
migration in its switchover (QEMU's ``device`` status: the guest stopped, its
last dirty pages and device state sent) counts as sending: on a real link
that burst shares the link with any other stream, and lengthens the downtime.

Every migration has the same contract and convergence policy: a downtime
target and a deadline past which the engine aborts it (the guest stays on A);
none allows post-copy. Per policy: total drain time (from the first request
to the last guest settled: for vmferry, the drain's own end time, taken by
the daemon on the same clock, so the bench's polling adds nothing), worst
downtime, guests over the downtime target, aborted migrations; guest memory
is checked (heartbeat continuity) on every guest after every run. Fresh
guests are booted for each policy. With ``--runs N`` every policy runs N
times, the order of the policies reversed every other run (the machine's
load drifts), and the vmferry/baseline drain time ratio is printed per run.

Usage::

    .venv/bin/python bench/evacuate_bench.py [--link 32] [--memory 128] [--hot 1.0]
        [--policies vmferry,nova,kubevirt,naive] [--deadline 60] [--runs 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmferry.api.models import EvacuateRequest
from vmferry.client import AsyncClient, Client
from vmferry.client import migration_calls as mc
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "evacuate.json"
POLICIES = ("vmferry", "nova", "kubevirt", "naive")
#: Dirty rates of the eight guests, as shares of the link (mixed: idle to hot).
DIRTY_SHARES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
#: Concurrency of the baselines: (total at once, at once per destination).
LIMITS = {"nova": (1, 1), "kubevirt": (2, 2), "naive": (8, 8)}
#: vmferry's --max-parallel and --per-destination: per link one sends, two set up ahead.
VMFERRY_LIMITS = (6, 3)
#: QEMU statuses in which a migration moves memory (takes its share of the link).
#: "device" too: the switchover's last pages and device state use the link (uncapped).
SENDING = {"active", "device", "postcopy-active", "postcopy-device"}
#: How often the baselines' link emulation looks at who sends, s.
LINK_POLL_S = 0.2


@dataclass
class Run:
    policy: str
    rep: int = 1
    drain_s: float = 0.0
    worst_downtime_ms: float = 0.0
    aborted: int = 0
    failed: int = 0
    over_target: int = 0
    memory_ok: bool = True
    moves: list[dict[str, Any]] = field(default_factory=list)


def _boot(a: Host, args: argparse.Namespace) -> dict[str, Heartbeat]:
    names = [f"g{i}" for i in range(len(DIRTY_SHARES))]
    with a.client() as c:
        for name, share in zip(names, DIRTY_SHARES, strict=True):
            c.create(
                guest_xml(
                    name,
                    memory_mib=args.memory,
                    stamp_mib=args.stamp,
                    dirty_mib_s=share * args.hot * args.link,
                )
            )
        return {n: wait_heartbeat(c, n, timeout=180) for n in names}


def _contract(args: argparse.Namespace) -> dict[str, Any]:
    return {"downtime_target_ms": args.downtime_target, "deadline_s": args.deadline}


async def _baseline(policy: str, a: Host, names: list[str], args: argparse.Namespace) -> Run:
    total, per_dest = LIMITS[policy]
    dests = {"host1": "", "host2": ""}
    with a.client() as c:
        for h in c.cluster().hosts:
            if h.name in dests:
                dests[h.name] = h.uri
    order = [(n, ("host1", "host2")[i % 2]) for i, n in enumerate(names)]
    run = Run(policy)
    sem = asyncio.Semaphore(total)
    dest_sems = {d: asyncio.Semaphore(per_dest) for d in dests}
    flags = int(MigrateFlags.LIVE | MigrateFlags.PEER2PEER)

    on_link: dict[str, list[str]] = {"host1": [], "host2": []}
    sending: dict[str, set[str]] = {"host1": set(), "host2": set()}

    async def emulate_links(src: AsyncClient, stop: asyncio.Event) -> None:
        # A link as TCP shares it: those sending get link / k (k: how many send), looked at
        # every LINK_POLL_S; a migration still setting up (or finishing) takes nothing.
        while not stop.is_set():
            for dest, names in on_link.items():
                now: set[str] = set()
                for name in list(names):
                    with contextlib.suppress(VmferryError):
                        info = await src.run(mc.jobinfo(name))
                        if info.stats.get("status") in SENDING:
                            now.add(name)
                if now != sending[dest]:
                    sending[dest] = now
                    for name in now:
                        with contextlib.suppress(VmferryError):
                            await src.run(mc.set_speed(name, max(1, args.link // len(now))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LINK_POLL_S)

    async def one(src: AsyncClient, name: str, dest: str) -> None:
        async with sem, dest_sems[dest]:
            on_link[dest].append(name)
            # Its cap until the emulator sees it send: its share with those sending now.
            share = max(1, args.link // (len(sending[dest]) + 1))
            t0 = time.monotonic()
            move: dict[str, Any] = {"name": name, "dest": dest, "bandwidth_mib_s": share}
            try:
                params = {"bandwidth_mib_s": share, **_contract(args)}
                result = await src.run(mc.migrate_p2p(name, dests[dest], flags, params))
                move["result"] = "done"
                move["downtime_ms"] = result.stats.get("downtime_ms")
                move["steps"] = result.steps
            except VmferryError as err:
                move["result"], move["error"] = "aborted", err.message
            finally:
                on_link[dest].remove(name)
                move["wall_s"] = round(time.monotonic() - t0, 2)
                run.moves.append(move)

    t0 = time.monotonic()
    async with AsyncClient(a.uri) as src, AsyncClient(a.uri) as poller:
        stop = asyncio.Event()
        links = asyncio.create_task(emulate_links(poller, stop))
        try:
            await asyncio.gather(*(one(src, n, d) for n, d in order))
        finally:
            stop.set()
            await links
    run.drain_s = time.monotonic() - t0
    return run


def _vmferry(a: Host, args: argparse.Namespace) -> Run:
    run = Run("vmferry")
    with a.client() as c:
        t0 = time.time()  # the daemon stamps the drain's end on this host's clock
        c.evacuate(
            EvacuateRequest(
                bandwidth_mib_s=args.link,
                max_parallel=VMFERRY_LIMITS[0],
                per_destination=VMFERRY_LIMITS[1],
                downtime_target_ms=args.downtime_target,
                deadline_s=args.deadline,
            )
        )
        while (info := c.evacuation()).state == "running":
            time.sleep(0.5)
        run.drain_s = (info.finished or time.time()) - t0
        c.set_maintenance(False)
    for m in info.moves:
        result = m.result if m.result != "failed" else "aborted"
        run.moves.append(
            {
                "name": m.name,
                "dest": m.dest,
                "bandwidth_mib_s": m.bandwidth_mib_s,
                "result": result,
                "downtime_ms": m.downtime_ms,
                "wall_s": m.wall_s,
                "steps": m.steps,
                "error": m.error,
                "turn": [m.turn_start_s, m.turn_end_s],
            }
        )
    return run


def _timeline(run: Run) -> list[str]:
    """Where a vmferry drain's time went, per link, from the drain's own turn stamps."""
    lines = []
    for dest in sorted({m["dest"] for m in run.moves}):
        turns = sorted(
            tuple(m["turn"]) for m in run.moves if m["dest"] == dest and None not in m["turn"]
        )
        if not turns:
            continue
        gaps = sum(max(0.0, b[0] - a[1]) for a, b in itertools.pairwise(turns))
        busy = sum(end - start for start, end in turns)
        lines.append(
            f"  {run.policy} run {run.rep}, link to {dest}: first turn at {turns[0][0]:.2f} s, "
            f"{len(turns)} turns {busy:.2f} s, gaps between them {gaps:.2f} s, "
            f"last handed over at {turns[-1][1]:.2f} s (from the drain's start, after the "
            f"measurement and plan); drain {run.drain_s:.2f} s from the request"
        )
    return lines


def _check(run: Run, hs: list[Host], before: dict[str, Heartbeat], target_ms: int) -> None:
    for m in run.moves:
        downtime = m.get("downtime_ms")
        if m["result"] == "done" and downtime is not None:
            run.worst_downtime_ms = max(run.worst_downtime_ms, float(downtime))
            run.over_target += float(downtime) > target_ms
        run.aborted += m["result"] == "aborted"
    for name, hb in before.items():
        for h in hs:
            with h.client() as c:
                if name in [d.name for d in c.list_domains()]:
                    try:
                        check_continuity(hb, wait_heartbeat(c, name, after=hb, timeout=60))
                    except AssertionError as err:
                        print(f"  {run.policy}: {name} memory check failed: {err}", file=sys.stderr)
                        run.memory_ok = False
                    break
        else:
            run.memory_ok = False
            print(f"  {run.policy}: {name} runs nowhere", file=sys.stderr)


def _clear(hs: list[Host]) -> None:
    for h in hs:
        with h.client() as c:
            for d in c.list_domains():
                c.destroy(d.name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--link", type=int, default=32, help="bandwidth of each link, MiB/s")
    p.add_argument("--memory", type=int, default=128, help="guest memory, MiB")
    p.add_argument("--stamp", type=int, default=32, help="guest memory written at boot, MiB")
    p.add_argument("--deadline", type=float, default=60.0, help="each migration's deadline, s")
    p.add_argument("--downtime-target", type=int, default=300, help="ms")
    p.add_argument("--hot", type=float, default=1.0, help="scales every guest's dirty rate")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--runs", type=int, default=1, help="runs of every policy, order alternating")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args()
    policies = [x for x in args.policies.split(",") if x]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)} (known: {', '.join(POLICIES)})")
    lockspace = Path(tempfile.mkdtemp(prefix="vfbe", dir="/tmp"))
    toml = f'[cluster]\nlockspace = "{lockspace}"\nheartbeat_interval = 0.5\n'
    runs: list[Run] = []
    try:
        with hosts(3, extra_config=toml) as hs:
            a = hs[0]
            with Client(a.uri) as c:
                while sum(1 for h in c.cluster().hosts if h.state == "up") < 3:
                    time.sleep(0.5)
            for rep in range(1, args.runs + 1):
                # The arms alternate: odd runs in the order given, even runs reversed.
                for policy in policies if rep % 2 else policies[::-1]:
                    runs.append(_one(policy, rep, hs, args))
    finally:
        shutil.rmtree(lockspace, ignore_errors=True)
    _report(runs, args)
    return 0 if all(r.memory_ok for r in runs) else 1


def _one(policy: str, rep: int, hs: list[Host], args: argparse.Namespace) -> Run:
    """Boot fresh guests on host0, drain it under *policy*, check every guest, clear."""
    a = hs[0]
    print(f"{policy} (run {rep}): booting {len(DIRTY_SHARES)} guests on host0", file=sys.stderr)
    before = _boot(a, args)
    print(f"{policy} (run {rep}): draining host0", file=sys.stderr)
    if policy == "vmferry":
        run = _vmferry(a, args)
    else:
        run = asyncio.run(_baseline(policy, a, list(before), args))
    run.rep = rep
    _check(run, hs, before, args.downtime_target)
    print(
        f"{policy} (run {rep}): {run.drain_s:.1f} s, worst downtime "
        f"{run.worst_downtime_ms:.0f} ms, over target {run.over_target}, aborted {run.aborted}",
        file=sys.stderr,
    )
    _clear(hs)
    return run


def _report(runs: list[Run], args: argparse.Namespace) -> None:
    print(
        f"\nEvacuation of 8 guests ({args.memory} MiB, dirty 0-{60 * args.hot:g} % of the link) "
        "from host0 to "
        f"host1 and host2, links {args.link} MiB/s each, downtime target "
        f"{args.downtime_target} ms, deadline {args.deadline:g} s per migration\n"
    )
    print(
        f"{'policy':<10} {'run':>3} {'drain s':>8} {'worst downtime ms':>18} "
        f"{'over target':>11} {'aborted':>8} {'memory':>7}"
    )
    for r in sorted(runs, key=lambda r: (r.rep, r.policy)):
        print(
            f"{r.policy:<10} {r.rep:>3} {r.drain_s:>8.1f} {r.worst_downtime_ms:>18.0f} "
            f"{r.over_target:>11} {r.aborted:>8} {'ok' if r.memory_ok else 'BAD':>7}"
        )
    for r in runs:
        for line in _timeline(r) if r.policy == "vmferry" else []:
            print(line)
    mine = {r.rep: r.drain_s for r in runs if r.policy == "vmferry"}
    for policy in dict.fromkeys(r.policy for r in runs if r.policy != "vmferry"):
        ratios = [mine[r.rep] / r.drain_s for r in runs if r.policy == policy and r.rep in mine]
        if ratios:
            shown = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"vmferry / {policy} drain time, per run: {shown}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [asdict(r) for r in runs]},
            indent=2,
        )
    )
    print(f"\n{args.json}")


if __name__ == "__main__":
    sys.exit(main())
