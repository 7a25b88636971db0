"""
``make bench``: vmferry's live migration against the bare-QEMU floor.

One guest is migrated back and forth between two ``vmferryd`` (unix sockets
on this host) while a second, identical guest is migrated back and forth
between bare QEMU processes driven directly over QMP (:func:`floor.bare_hop`).
Hops of the two paths alternate, and which one goes first alternates too, so
that whatever else the machine does hits both alike.

Both guests run the vmferry test guest, which checks its own memory: after
every hop the bench waits for a heartbeat from the destination and checks it
continues the source's (same boot id, sequence advanced, no bad pages). A
corrupted or rebooted guest fails the bench.

Usage::

    .venv/bin/python bench/migrate_bench.py [--hops 10] [--p2p] [--cli] [--trace] [--qemu-trace]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmferry import trace
from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import (
    Heartbeat,
    check_continuity,
    guest_cmdline,
    guest_paths,
    guest_xml,
)
from vmferry.testing import Host, kill_qemu, poll_heartbeat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qemu_downtime
from floor import BareQemu, bare_hop, guest_argv

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "migrate.json"
#: The issue's target: vmferry's hop end to end within this factor of the floor's.
TARGET_RATIO = 1.2
#: The issue's target: guest-visible downtime within QEMU's own downtime + this (median).
TARGET_BEYOND_QEMU_MS = 20
STEPS = ("begin", "prepare", "perform", "finish", "confirm")


@dataclass(frozen=True)
class GuestShape:
    memory_mib: int = 192
    stamp_mib: int = 64
    dirty_mib_s: float = 16
    hb_ms: int = 500
    #: Appended to the guest's kernel command line (e.g. ``vmferry.corrupt_after=2``).
    extra_cmdline: str = ""


# -- daemons -------------------------------------------------------------------------------------


def daemon(
    root: Path,
    name: str,
    port_min: int,
    log_level: str,
    trace: Path | None,
    *,
    qemu_trace: bool = False,
) -> Host:
    """One ``vmferryd`` with its own state dir and unix socket (under the tracer with *trace*).

    *qemu_trace*: its QEMUs log the trace events of :mod:`qemu_downtime`.
    """
    return Host(
        root,
        name,
        port_min,
        port_span=15,
        wait_timeout=None,
        log_level=log_level,
        insecure=True,  # peers named by unix socket (bench only)
        uuid_value=str(uuid.uuid4()),
        # Run through this script's tracing wrapper, writing its records to *trace*.
        launcher=[sys.executable, __file__, TRACE_FLAG, str(trace), "--"] if trace else None,
        extra_config=qemu_downtime.config_toml() if qemu_trace else "",
    )


async def start_daemon(host: Host, timeout: float = 90.0) -> None:  # a loaded machine is slow
    host.spawn()
    await host.wait_ready_async(timeout)


async def stop_daemon(host: Host) -> None:
    """SIGTERM the daemon; QEMU outlives its daemon by design: kill whatever it started."""
    await asyncio.to_thread(host.kill, signal.SIGTERM, 10.0)
    kill_qemu(host.state_dir)


# -- the two paths -------------------------------------------------------------------------------


async def _poll_heartbeat(
    read: Callable[[], Awaitable[str]], after: Heartbeat | None, timeout: float
) -> Heartbeat:
    """The newest heartbeat once it is newer than *after* (or the first one)."""
    return await poll_heartbeat(read, after=after, timeout=timeout, interval=0.05)


@dataclass
class VmferryPath:
    """The guest under vmferry, hopping between two daemons."""

    hosts: tuple[AsyncClient, AsyncClient]
    name: str
    p2p: bool
    #: --cli: each hop is a `vmferry migrate` process (this argv, then its options).
    cli: list[str] | None = None
    here: int = 0
    boot: Heartbeat | None = None
    last: Heartbeat | None = None
    hops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.cli:
            return "vmferry migrate" + (" --p2p" if self.p2p else "")
        return "vmferry p2p" if self.p2p else "vmferry v3"

    async def _console(self) -> str:
        return (await self.hosts[self.here].console(self.name)).data

    async def boot_guest(self, shape: GuestShape, timeout: float) -> None:
        xml = guest_xml(
            self.name,
            memory_mib=shape.memory_mib,
            stamp_mib=shape.stamp_mib,
            dirty_mib_s=shape.dirty_mib_s,
            hb_ms=shape.hb_ms,
            extra_cmdline=shape.extra_cmdline,
        )
        await self.hosts[0].create(xml)
        self.boot = self.last = await _poll_heartbeat(self._console, None, timeout)

    async def hop(self, dests: Sequence[str]) -> None:
        src, dst = self.hosts[self.here], self.hosts[1 - self.here]
        flags = MigrateFlags.LIVE
        t_start = time.time()
        t0 = time.perf_counter()
        report: MigrationReport
        if self.cli:
            report = await self._cli_hop(src.uri, dests[1 - self.here])
        elif self.p2p:
            report = await migrate_p2p(
                src, dests[1 - self.here], self.name, flags | MigrateFlags.PEER2PEER
            )
        else:
            report = await migrate(src, dst, self.name, flags, MigrationParams())
        wall = time.perf_counter() - t0
        self.here = 1 - self.here
        stats = report.stats
        hop: dict[str, Any] = {
            "to": self.here,
            "t_start": t_start,
            "t_end": t_start + wall,
            "wall_s": wall,
            "report_wall_s": report.wall_s,
            "steps_s": dict(report.steps),
            "other_s": report.wall_s - sum(report.steps.values()),
            # guest-visible downtime, as the daemons measure it (source STOP to Finish's
            # reply, less the time since the destination resumed: an upper bound)
            "paused_ms": _num(stats.get("guest_downtime_ms")),
            "qemu_downtime_ms": _num(stats.get("downtime_ms")),
            "qemu_total_ms": _num(stats.get("total_time_ms")),
            "qemu_setup_ms": _num(stats.get("setup_time_ms")),
            "ram_transferred": _num(stats.get("data_processed")),
            "iterations": _num(stats.get("memory_iteration")),
        }
        self.hops.append(hop)

    async def _cli_hop(self, src_uri: str, dest_uri: str) -> MigrationReport:
        """One ``vmferry -c SRC migrate --live NAME DEST --json`` process: its report."""
        assert self.cli is not None
        argv = [*self.cli, "-c", src_uri, "migrate", "--live", self.name, dest_uri, "--json"]
        proc = await asyncio.create_subprocess_exec(
            *(argv + (["--p2p"] if self.p2p else [])),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise VmferryError("operation-failed", f"vmferry migrate failed: {err.decode()}")
        data = json.loads(out)
        return MigrationReport(wall_s=data["wall_s"], steps=data["steps"], stats=data["stats"])

    async def verify(self) -> None:
        """Wait for the destination's next heartbeat; it must continue the last one."""
        assert self.last is not None
        hb = await _poll_heartbeat(self._console, self.last, 30)
        check_continuity(self.last, hb)
        self.last = hb

    async def destroy(self) -> None:
        for client in self.hosts:
            with contextlib.suppress(VmferryError):
                await client.destroy(self.name)


@dataclass
class FloorPath:
    """The same guest under bare QEMU, hopping between fresh QEMU processes."""

    workdir: Path
    cmdline: str
    memory_mib: int
    #: More QEMU options for every QEMU of this path (e.g. qemu_downtime.argv()).
    extra: list[str] = field(default_factory=list)
    qemu: BareQemu | None = None
    console: Path | None = None
    count: int = 0
    boot: Heartbeat | None = None
    last: Heartbeat | None = None
    hops: list[dict[str, Any]] = field(default_factory=list)

    label = "bare QEMU"

    def _argv(self, tag: str, *, incoming: bool) -> tuple[list[str], Path, Path]:
        kernel, initrd = guest_paths()
        qmp, console = self.workdir / f"{tag}.qmp", self.workdir / f"{tag}.con"
        argv = guest_argv(
            kernel,
            initrd,
            self.cmdline,
            qmp=qmp,
            console=console,
            memory_mib=self.memory_mib,
            incoming=incoming,
            extra=self.extra,
        )
        return argv, qmp, console

    async def _console(self) -> str:
        assert self.console is not None
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def boot_guest(self, timeout: float) -> None:
        argv, qmp, self.console = self._argv("q0", incoming=False)
        qemu = BareQemu(argv, qmp, log=self.workdir / "q0.log")
        self.qemu = qemu
        await qemu.start()
        await qemu.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        self.boot = self.last = await _poll_heartbeat(self._console, None, timeout)

    async def hop(self, dests: Sequence[str]) -> None:
        assert self.qemu is not None
        self.count += 1
        tag = f"q{self.count}"
        argv, qmp, console = self._argv(tag, incoming=True)
        dst, result = await bare_hop(self.qemu, argv, qmp, log=self.workdir / f"{tag}.log")
        self.qemu, self.console = dst, console
        hop = {k: v for k, v in asdict(result).items() if k != "info"}
        hop["wall_s"] = result.total_s
        hop["paused_beyond_qemu_ms"] = result.paused_ms - _num(result.qemu_downtime_ms)
        self.hops.append(hop)

    async def verify(self) -> None:
        """Wait for the destination's next heartbeat; it must continue the last one."""
        assert self.last is not None
        hb = await _poll_heartbeat(self._console, self.last, 30)
        check_continuity(self.last, hb)
        self.last = hb

    async def destroy(self) -> None:
        if self.qemu is not None:
            await self.qemu.stop()


#: --cli-src: the source tree the CLI processes run from (the daemons always run this one's).
CLI_SRC = [REPO / "src"]


def cli_env() -> dict[str, str]:
    """A CLI process's environment: as installed, with its bytecode cache (see cli_bench.py)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CLI_SRC[0]), env.get("PYTHONPATH")) if p)
    return env


def vmferry_argv() -> list[str]:
    """The installed ``vmferry`` next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "vmferry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmferry.cli.main"]


def _children_cpu_ns() -> int:
    """CPU time of this process's finished children (the `vmferry migrate` processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def _cpu_ns(pids: Sequence[int]) -> int:
    """CPU time used so far by all threads of *pids* (schedstat: nanoseconds)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


# -- tracing (--trace) ---------------------------------------------------------------------------
#
# To say where vmferry's time goes below the five steps, --trace runs each
# daemon through this script with a listener on vmferry.trace, which records
# what a migration waits for (status-file writes, QMP commands, QEMU start and
# kill, the API handlers), and records the client's own API calls. The records
# carry the host's wall clock, so both daemons' and the client's line up per hop.
# Tracing costs a little itself: the plain run's numbers are the ones to quote.

TRACE_FLAG = "--as-traced-daemon"

Record = trace.Record

#: vmferry.trace kinds as this bench names them; in a daemon, its client is the p2p one.
_DAEMON_KINDS = {
    "client create": "p2p client create",
    "client session": "p2p client session",
    "client close": "p2p client close",
}

#: QEMU's migration as a daemon sees it: it starts, the source stops, the stream completes.
_WINDOW_EVENTS = ("MIGRATION setup", "MIGRATION active", "STOP", "MIGRATION completed")

_PLUMBING = frozenset(
    {"atomic_write", "write_json", "_save_status", "save", "set_state", "_changed_hook"}
)


def _writer(callers: str) -> str:
    """Who asked for a status write: the first two functions above the plumbing."""
    names = [n for n in callers.split(" < ") if n and n not in _PLUMBING]
    return " < ".join(names[:2])


def _traced_daemon(path: Path, daemon_argv: list[str]) -> int:
    """Run ``vmferryd`` with a trace listener; write the records to *path* on exit."""
    import atexit

    import vmferry.daemon.main as daemon_main

    records: list[Record] = []

    def listen(record: Record) -> None:
        wall, seconds, kind, what = record
        if kind == "client call":
            return  # the p2p client's calls: the daemon handlers already time them
        if kind == "status write":
            what = _writer(what)
        if kind == "qemu event" and what in _WINDOW_EVENTS:
            # This daemon's CPU so far (all its threads): see _window_cpu_ms.
            records.append(
                (time.time(), time.process_time(), "daemon cpu", f"{what}@{os.getpid()}")
            )
        records.append((wall, seconds, _DAEMON_KINDS.get(kind, kind), what))

    trace.add_listener(listen)
    atexit.register(lambda: path.write_text(json.dumps(records)))
    return daemon_main.main(daemon_argv)


def _trace_client(records: list[Record]) -> None:
    """Record every API call the bench's clients make (in this process)."""

    def listen(record: Record) -> None:
        wall, seconds, kind, what = record
        if kind == "client call":
            records.append((wall, seconds, "client", what))

    trace.add_listener(listen)


def _step_of(path: str) -> str | None:
    tail = path.rsplit("/", 1)[-1]
    return tail if tail in STEPS else None


def trace_breakdown(
    hops: list[dict[str, Any]], client: list[Record], daemons: list[list[Record]]
) -> dict[str, dict[str, dict[str, float]]]:
    """
    Per step, the median over hops of where the time went.

    Each hop's steps are bounded by the client's calls (``.../migrate/<step>``);
    every daemon record starting inside a step's call is charged to that step.
    With ``--cli`` the calls are made in the `vmferry migrate` process, which
    records none: the daemons' API handler spans bound the steps instead (no
    ``client call ms`` then; the HTTP round trip is outside every window).
    """
    per_hop: list[dict[str, dict[str, float]]] = []
    everything = sorted(r for rs in daemons for r in rs)
    for hop in hops:
        lo, hi = hop["t_start"], hop["t_end"]
        calls = [r for r in client if lo <= r[0] <= hi]
        by_handler = not calls
        if by_handler:
            # (not the sessions: their spans last the whole migration)
            calls = [
                r
                for r in everything
                if r[2] == "api" and lo <= r[0] <= hi and not r[3].endswith("/session")
            ]
        acc: dict[str, dict[str, float]] = {}
        for wall, dur, _kind, what in calls:
            step = _step_of(what.split(" ", 1)[1]) or "client other"
            bucket = acc.setdefault(step, {})
            if not by_handler:
                bucket["client call ms"] = bucket.get("client call ms", 0.0) + dur * 1000
            for r_wall, r_dur, r_kind, r_what in everything:
                if not wall <= r_wall <= wall + dur:
                    continue
                key = _trace_key(r_kind, r_what)
                if key is None:
                    continue
                bucket[key + " ms"] = bucket.get(key + " ms", 0.0) + r_dur * 1000
                bucket[key + " n"] = bucket.get(key + " n", 0.0) + 1
                if r_kind == "status write":
                    who = f"  status write by {r_what} n"
                    bucket[who] = bucket.get(who, 0.0) + 1
        events = [r for r in everything if lo <= r[0] <= hi]
        stops = [r[0] for r in events if r[2] == "qemu event" and r[3] == "STOP"]
        resumes = [r[0] for r in events if r[2] == "qemu event" and r[3] == "RESUME"]
        downtime = [r[1] for r in events if r[2] == "qemu downtime"]
        hop_acc = acc.setdefault("hop", {})
        if stops and resumes:
            hop_acc["guest paused, STOP->RESUME event ms"] = (resumes[-1] - stops[0]) * 1000
        if downtime:
            hop_acc["QEMU downtime ms"] = downtime[-1] * 1000
        if stops and resumes and downtime:
            # Source done sending -> guest running again: what the protocol adds to downtime.
            hop_acc["paused beyond QEMU downtime ms"] = (
                (resumes[-1] - stops[0]) - downtime[-1]
            ) * 1000
        hop_acc.update(_window_cpu_ms(events))
        hop_acc["status writes n"] = sum(1.0 for r in events if r[2] == "status write")
        hop_acc["status writes ms"] = sum(r[1] for r in events if r[2] == "status write") * 1000
        prepare = acc.get("prepare")
        if prepare is not None:
            polls = [r for r in everything if r[2] == "socket poll" and lo <= r[0] <= hi]
            found = next((i for i, r in enumerate(polls) if r[3] == "found"), None)
            if found:
                prepare["socket polls n"] = found + 1.0
                # Upper bound of what the poll's back-off added to QEMU's start.
                prepare["socket found - last miss ms"] = (
                    polls[found][0] - polls[found - 1][0]
                ) * 1000
        per_hop.append(acc)
    steps = [*STEPS, "client other", "hop"]
    result: dict[str, dict[str, dict[str, float]]] = {}
    for step in steps:
        keys = sorted({k for h in per_hop for k in h.get(step, {})})
        out = {k: summary([h.get(step, {}).get(k, 0.0) for h in per_hop])["median"] for k in keys}
        if out:
            result[step] = {k: {"median": v} for k, v in out.items()}
    return result


def _window_cpu_ms(events: list[Record]) -> dict[str, float]:
    """CPU the daemons used while QEMU migrated: before and during QEMU's downtime.

    Each daemon records its process CPU (all its threads) when it sees one of
    `_WINDOW_EVENTS`, labelled with its pid. The source's STOP splits its QEMU's
    migration (``MIGRATION setup`` to ``completed``) in two: the live phase, whose
    speed decides how much RAM is left when QEMU stops the guest (it stops it as
    soon as the rest fits in ``downtime-limit`` at the measured bandwidth), and
    QEMU's downtime. On a 2-core host every CPU millisecond a daemon spends in
    either is taken from QEMU's migration thread or the destination's loader.
    """
    marks = [r for r in events if r[2] == "daemon cpu"]
    stop = next((r for r in marks if r[3].startswith("STOP@")), None)
    if stop is None:
        return {}
    src = stop[3].partition("@")[2]

    def first(what: str, pid: str, after: float = 0.0) -> Record | None:
        return next((r for r in marks if r[3] == f"{what}@{pid}" and r[0] >= after), None)

    out: dict[str, float] = {}
    setup, done = first("MIGRATION setup", src), first("MIGRATION completed", src, stop[0])
    if setup is not None:
        out["source daemon CPU, migrate -> STOP ms"] = (stop[1] - setup[1]) * 1000
    if done is not None:
        out["source daemon CPU, STOP -> completed ms"] = (done[1] - stop[1]) * 1000
    for dst in {r[3].partition("@")[2] for r in marks} - {src}:
        active, end = first("MIGRATION active", dst), first("MIGRATION completed", dst)
        if active is not None and end is not None:
            out["destination daemon CPU, active -> completed ms"] = (end[1] - active[1]) * 1000
    return out


def _trace_key(kind: str, what: str) -> str | None:
    if kind in ("socket poll", "qemu downtime", "daemon cpu"):
        return None
    if kind == "qmp":
        return f"qmp {what}"
    if kind == "api":
        step = _step_of(what.split(" ", 1)[-1])
        return f"daemon handler {step or what}"
    if kind == "wait":
        return f"wait in {what}"
    if kind == "qemu event":
        return (
            None
            if not what.startswith(("MIGRATION completed", "STOP", "RESUME"))
            else (f"event lag {what}")
        )
    return kind


def render_trace(breakdown: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["", "traced (median per hop; ms, n = count):"]
    for step, items in breakdown.items():
        lines.append(f"  {step}")
        for key, v in items.items():
            val = v["median"]
            lines.append(f"    {key:<44}{val:9.1f}")
    return "\n".join(lines)


# -- statistics and the report -------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, min and max of the finite *values* (NaN when there are none)."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(hops: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    return {k: summary([_num(h.get(k)) for h in hops]) for k in keys}


def step_summary(hops: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {s: summary([_num(h["steps_s"].get(s)) for h in hops]) for s in STEPS}


def _ms(s: dict[str, float], scale: float = 1000.0) -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['median'] * scale:7.1f}  ({s['min'] * scale:.0f}-{s['max'] * scale:.0f})"


def _ratio(a: dict[str, float], b: dict[str, float]) -> float:
    if a["n"] == 0 or b["n"] == 0 or b["median"] == 0:
        return math.nan
    return a["median"] / b["median"]


def render(result: dict[str, Any]) -> str:
    vm, fl = result["vmferry"], result["floor"]
    vs, fs = vm["summary"], fl["summary"]
    lines = [
        f"{result['hops']} hops each, interleaved; guest {result['guest']['memory_mib']} MiB RAM,"
        f" {result['guest']['stamp_mib']} MiB stamped, dirtying"
        f" {result['guest']['dirty_mib_s']:g} MiB/s; TCG",
        "",
        f"{'median ms (min-max)':<26}{vm['label']:>22}{'bare QEMU':>22}{'ratio':>9}",
    ]
    rows = [
        ("wall per hop", "wall_s", 1000.0),
        ("guest paused", "paused_ms", 1.0),
        ("QEMU downtime", "qemu_downtime_ms", 1.0),
        ("guest paused - QEMU's", "paused_beyond_qemu_ms", 1.0),
        ("QEMU total_time", "qemu_total_ms", 1.0),
        ("QEMU setup_time", "qemu_setup_ms", 1.0),
        ("wall - QEMU total_time", "outside_qemu_ms", 1.0),
        ("manager CPU time", "manager_cpu_ms", 1.0),
    ]
    for title, key, scale in rows:
        r = _ratio(vs[key], fs[key])
        lines.append(
            f"{title:<26}{_ms(vs[key], scale):>22}{_ms(fs[key], scale):>22}"
            + (f"{r:>8.2f}x" if not math.isnan(r) else f"{'':>9}")
        )
    lines.append(
        "  (guest paused: vmferry's guest_downtime_ms from the daemons, the floor's STOP event"
        " to its cont)"
    )
    lines.append(
        f"{'RAM sent, MiB':<26}{vs['ram_transferred']['median'] / 2**20:>22.1f}"
        f"{fs['ram_transferred']['median'] / 2**20:>22.1f}"
    )
    lines += ["", "where the time goes (median ms):"]
    pairs = [
        ("begin", None),
        ("prepare", ("spawn_s", "setup_s")),
        ("perform", ("migrate_s",)),
        ("finish", ("resume_s",)),
        ("confirm", ("kill_s",)),
    ]
    steps = vm["steps"]
    for step, counterpart in pairs:
        left = f"  {step:<9}{steps[step]['median'] * 1000:8.1f}"
        right = ""
        if counterpart:
            total = sum(fs[k]["median"] for k in counterpart) * 1000
            right = (
                f"   floor {'+'.join(c.removesuffix('_s') for c in counterpart):<12}{total:8.1f}"
            )
        lines.append(left + right)
    lines.append(
        f"  {'other':<9}{vs['other_s']['median'] * 1000:8.1f}"
        "   (client: sessions, protocol probe; outside the five steps)"
    )
    lines.append(
        f"  {'stats':<9}{vs['after_s']['median'] * 1000:8.1f}"
        + (
            "   (the process: start, imports, the statistics after the migration, exit)"
            if result.get("cli")
            else "   (client: the statistics after the migration, inside the wall time)"
        )
    )
    if result.get("cli"):
        lines.append(
            f"  {'cli CPU':<9}{vs['cli_cpu_ms']['median']:8.1f}"
            "   (the `vmferry migrate` process's own CPU time, user + system; in manager CPU)"
        )
    ratio = result["ratio_wall"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    lines += [
        "",
        f"vmferry/floor wall per hop: {ratio:.2f}x (target {TARGET_RATIO}x: {verdict});"
        f" guest paused: {result['ratio_paused']:.2f}x",
        f"guest paused beyond QEMU's downtime: median {result['beyond_qemu_ms']:.1f} ms"
        f" (target {TARGET_BEYOND_QEMU_MS} ms:"
        f" {'met' if result['beyond_qemu_ms'] <= TARGET_BEYOND_QEMU_MS else 'NOT met'})",
        f"vmferry adds {result['added_ms']:.0f} ms per hop outside QEMU's own migration;"
        f" with QEMU's time equal on both paths: {result['ratio_same_qemu']:.2f}x",
        f"guest heartbeats: {result['verified']}",
    ]
    load = result["loadavg"]
    lines.append(f"load average before/after: {load[0]:.1f} / {load[1]:.1f}")
    if max(load) > (result["cpus"] or 1):
        lines.append(
            "  (the machine was busy with more than this bench: QEMU's own times, and so the"
            " ratios, are noisy; the 'outside QEMU' figures are the steadier ones)"
        )
    return "\n".join(lines)


def build_result(
    args: argparse.Namespace, shape: GuestShape, vm: VmferryPath, fl: FloorPath
) -> dict[str, Any]:
    for h in vm.hops:
        h["outside_qemu_ms"] = h["wall_s"] * 1000 - h["qemu_total_ms"]
        h["paused_beyond_qemu_ms"] = h["paused_ms"] - h["qemu_downtime_ms"]
        h["after_s"] = h["wall_s"] - h["report_wall_s"]
    for h in fl.hops:
        h["outside_qemu_ms"] = h["wall_s"] * 1000 - _num(h["qemu_total_ms"])
    common = (
        "wall_s",
        "manager_cpu_ms",
        "paused_ms",
        "qemu_total_ms",
        "qemu_setup_ms",
        "outside_qemu_ms",
        "ram_transferred",
        "iterations",
    )
    vs = summarize(
        vm.hops,
        (
            *common,
            "qemu_downtime_ms",
            "paused_beyond_qemu_ms",
            "other_s",
            "after_s",
            "report_wall_s",
            "cli_cpu_ms",
        ),
    )
    fs = summarize(
        fl.hops,
        (
            *common,
            "qemu_downtime_ms",
            "paused_beyond_qemu_ms",
            "spawn_s",
            "setup_s",
            "migrate_s",
            "resume_s",
            "kill_s",
        ),
    )
    added_ms = vs["outside_qemu_ms"]["median"] - fs["outside_qemu_ms"]["median"]
    floor_ms = fs["wall_s"]["median"] * 1000
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hops": args.hops,
        "mode": ("p2p" if args.p2p else "client-managed v3")
        + (", vmferry CLI" if args.cli else ""),
        "cli": bool(args.cli),
        "cli_src": str(CLI_SRC[0]) if args.cli else None,
        "guest": asdict(shape),
        "cpus": os.cpu_count(),
        "target_ratio": TARGET_RATIO,
        "ratio_wall": _ratio(vs["wall_s"], fs["wall_s"]),
        "ratio_paused": _ratio(vs["paused_ms"], fs["paused_ms"]),
        "beyond_qemu_ms": vs["paused_beyond_qemu_ms"]["median"],
        # Robust to QEMU's own time swinging with the machine's load: vmferry's
        # added time (outside QEMU's migration) on top of the floor's median hop.
        "added_ms": added_ms,
        "ratio_same_qemu": (floor_ms + added_ms) / floor_ms if floor_ms else math.nan,
        "verified": (
            f"vmferry boot {vm.boot.boot if vm.boot else '?'} seq "
            f"{vm.boot.seq if vm.boot else '?'}->{vm.last.seq if vm.last else '?'} errors=0; "
            f"floor boot {fl.boot.boot if fl.boot else '?'} seq "
            f"{fl.boot.seq if fl.boot else '?'}->{fl.last.seq if fl.last else '?'} errors=0"
        ),
        "vmferry": {
            "label": vm.label,
            "summary": vs,
            "steps": step_summary(vm.hops),
            "hops": vm.hops,
        },
        "floor": {"label": fl.label, "summary": fs, "hops": fl.hops},
    }


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# -- the run -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="vfb", dir="/tmp"))
    try:
        yield d
    finally:
        if keep:
            print(f"kept {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = GuestShape(
        memory_mib=args.memory_mib,
        stamp_mib=args.stamp_mib,
        dirty_mib_s=args.dirty_mib_s,
        extra_cmdline=args.guest_extra,
    )
    cmdline = guest_cmdline(
        stamp_mib=shape.stamp_mib,
        dirty_mib_s=shape.dirty_mib_s,
        hb_ms=shape.hb_ms,
        extra_cmdline=shape.extra_cmdline,
    )
    with _workdir(args.keep) as work:
        base = random.randrange(40000, 48000, 32)
        daemons = [
            daemon(
                work / f"h{i}",
                f"bench{i}",
                base + 16 * i,
                args.daemon_log_level,
                trace=work / f"trace{i}.json" if args.trace else None,
                qemu_trace=args.qemu_trace,
            )
            for i in range(2)
        ]
        client_records: list[Record] = []
        if args.trace:
            _trace_client(client_records)
        (work / "floor").mkdir()
        fl = FloorPath(
            work / "floor",
            cmdline,
            shape.memory_mib,
            extra=qemu_downtime.argv() if args.qemu_trace else [],
        )
        async with contextlib.AsyncExitStack() as stack:
            for d in daemons:
                stack.push_async_callback(stop_daemon, d)
            await asyncio.gather(*(start_daemon(d) for d in daemons))
            clients = tuple([await stack.enter_async_context(AsyncClient(d.uri)) for d in daemons])
            cli = vmferry_argv() if args.cli else None
            if cli:  # warm the CLI's bytecode cache, as an installed vmferry has it
                await asyncio.to_thread(
                    subprocess.run, [*cli, "--help"], env=cli_env(), capture_output=True
                )
            vm = VmferryPath((clients[0], clients[1]), "bench", args.p2p, cli)
            stack.push_async_callback(vm.destroy)
            stack.push_async_callback(fl.destroy)
            log("booting both guests")
            await asyncio.gather(vm.boot_guest(shape, 60), fl.boot_guest(60))
            dests = [d.uri for d in daemons]
            paths: list[VmferryPath | FloorPath] = [vm, fl]
            # The CPU the management layer burns per hop: daemons and client, or the driver.
            managers = {
                vm.label: [os.getpid(), *(d.proc.pid for d in daemons if d.proc)],
                fl.label: [os.getpid()],
            }
            for i in range(args.hops):
                # Alternate who goes first, so neither always follows the other's aftermath.
                for p in paths if i % 2 == 0 else paths[::-1]:
                    # The CLI processes are this bench's children; the floor's QEMUs are too,
                    # but their CPU is the guest's, not the driver's.
                    children = p is vm and cli is not None
                    child = _children_cpu_ns() if children else 0
                    cpu = _cpu_ns(managers[p.label]) + child
                    await p.hop(dests)
                    h = p.hops[-1]
                    child_after = _children_cpu_ns() if children else 0
                    cpu_after = _cpu_ns(managers[p.label]) + child_after
                    h["manager_cpu_ms"] = (cpu_after - cpu) / 1e6
                    if children:  # the `vmferry migrate` process's own share
                        h["cli_cpu_ms"] = (child_after - child) / 1e6
                    await p.verify()
                    log(f"hop {i + 1:2}/{args.hops} {p.label:<12} {h['wall_s'] * 1000:7.1f} ms")
        result = build_result(args, shape, vm, fl)
        if args.trace:
            traces = [json.loads((work / f"trace{i}.json").read_text()) for i in range(2)]
            records = [[(float(a), float(b), str(c), str(e)) for a, b, c, e in t] for t in traces]
            result["trace"] = trace_breakdown(vm.hops, client_records, records)
        if args.qemu_trace:
            # QEMU's logs: the floor's, and the daemons' (state/log/NAME.log)
            logs = {vm.label: sorted(work.glob("h*/state/log/*.log")), fl.label: sorted(
                (work / "floor").glob("q*.log"))}  # fmt: skip
            result["qemu_trace"] = {
                label: qemu_downtime.breakdown(qemu_downtime.hops(files))
                for label, files in logs.items()
            }
        return result


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hops", type=int, default=10, help="migrations per path (default 10)")
    p.add_argument("--p2p", action="store_true", help="vmferry migrates peer-to-peer")
    p.add_argument(
        "--cli",
        action="store_true",
        help="each vmferry hop is a `vmferry migrate --json` process (the whole command's cost)",
    )
    p.add_argument(
        "--cli-src",
        type=Path,
        help="with --cli: run the CLI from this source tree (e.g. main's, for a before/after of "
        "the client alone; the daemons run this tree's)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    p.add_argument("--memory-mib", type=int, default=192)
    p.add_argument("--stamp-mib", type=int, default=64)
    p.add_argument("--dirty-mib-s", type=float, default=16)
    p.add_argument(
        "--guest-extra",
        default="",
        metavar="ARGS",
        help="extra guest kernel arguments, e.g. vmferry.corrupt_after=2 (the bench must fail)",
    )
    p.add_argument("--daemon-log-level", default="info", choices=["debug", "info", "warning"])
    p.add_argument(
        "--enforce", action="store_true", help=f"exit 1 when vmferry is over {TARGET_RATIO}x"
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, consoles)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="also break vmferry's steps down (status writes, QMP, QEMU start/kill, API)",
    )
    p.add_argument(
        "--qemu-trace",
        action="store_true",
        help="both paths' QEMUs log their downtime checkpoints: where QEMU's downtime goes",
    )
    args = p.parse_args(argv)
    if args.hops < 1:
        p.error("--hops must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TRACE_FLAG]:
        return _traced_daemon(Path(argv[1]), argv[3:])
    args = parse_args(argv)
    if args.cli_src:
        CLI_SRC[0] = args.cli_src.resolve()
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        result = asyncio.run(run(args))
    except AssertionError as err:
        print(f"FAILED: the guest did not survive: {err}", file=sys.stderr)
        return 1
    except VmferryError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    result["bench_s"] = time.monotonic() - started
    result["loadavg"] = [load_before, os.getloadavg()[0]]
    print(render(result))
    if "trace" in result:
        print(render_trace(result["trace"]))
    if "qemu_trace" in result:
        print(qemu_downtime.render(result["qemu_trace"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    print(f"\n(bench took {result['bench_s']:.0f} s; results in {args.json})")
    if args.enforce and not result["ratio_wall"] <= TARGET_RATIO:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
