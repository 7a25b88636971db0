"""
``make bench-storage``: vmferry's storage migration against the bare-QMP NBD floor.

Two identical test guests, each with a 1 GiB qcow2 disk holding 256 MiB of
stamped data (host-stamped, so both start alike), writing to it during every
hop (re-stamps at ``--disk-mib-s``) and reading it back, besides stamping
and dirtying their memory:

* **vmferry**: two ``vmferryd`` (unix sockets on this host, each with its own
  image directory as a root), client-managed v3 ``--copy-storage-all``, the
  destination's XML naming its own directory;
* **floor**: bare QEMU processes driven over QMP (:func:`floor.bare_storage_hop`):
  create the destination disk, NBD server + export on the destination,
  ``blockdev-add nbd`` + ``blockdev-mirror`` on the source, migrate with
  ``pause-before-switchover``, end the mirrors there, ``cont``, kill the source.

Hops of the two alternate (and which goes first alternates). After each hop
the guest's next heartbeat must continue the last one (memory and disk: no
bad page, no bad block, no I/O error); the source's image is then deleted, so
every hop creates its destination disk anew. At the end both guests are
stopped and their final images checked block by block
(:func:`vmferry.testing.disk.verify_disk_image`). A corrupted guest fails the
bench (exit 1).

Figures (``wall`` is one hop as its caller sees it: vmferry from the client's
first call to the migration's report, the floor from ``qemu-img create`` to the
killed source):

* **ratio of the medians**: vmferry plain's median wall per hop / the floor's;
  the target 1.2x applies to it.
* **per pair**: hop *i* of vmferry / hop *i* of the floor, which ran right
  before or after it in the same round (the order alternates); their median and
  spread (max - min). A hop's copy swings with the machine's load, and both
  hops of a pair see about the same load, so the pairs' median is the steadier
  figure and the spread says how far one pair can be trusted.
* **the parts of a hop** (median ms per hop, each arm on its own, and
  vmferry - floor), none but the last depending on how fast QEMU copied:

  - ``set-up``: vmferry's Prepare step (as the client timed it: the request,
    the disk's creation, QEMU's launch, NBD server, status writes) against
    the floor's create + spawn + NBD (``qemu-img create``, the destination QEMU
    until QMP answers, NBD server, exports and the source's NBD client nodes);
  - ``tail``: vmferry's Finish + Confirm steps against the floor's resume + kill
    (``nbd-server-stop``, ``cont``, kill and reap the source);
  - ``wall - mirror - migrate``: the hop less the copy, on each arm: less the
    mirrors' time until in sync (vmferry: the source's ``disk_sync_ms``, from its
    ``blockdev-add`` + ``blockdev-mirror`` batch to the last ``BLOCK_JOB_READY``;
    the floor: from its ``blockdev-mirror`` to the last ``BLOCK_JOB_READY``) and
    less QEMU's own ``total_time`` of the memory migration (from ``migrate`` to
    completed, the switchover's drain included), so what is left is what each
    arm does around QEMU's copy (vmferry: its protocol, status writes and QMP
    round trips outside those two; the floor: its QMP calls, spawn and kill);
  - ``the copy``: mirror + migrate as above, for reference: this is the part
    that swings.

The target 1.2x is for the ratio of the medians. Other
vmferry variants (:data:`VARIANTS`: ``p2p``; ``tls`` and ``tunnelled`` once
vmferry has the flags) run as further guests beside the plain one, each
compared with its baseline (p2p with the floor, tls with plain, tunnelled with
direct p2p over the same mutual-TLS peer connection): the hook for the TLS and
tunnel throughput ratios of issue 8.

Usage::

    .venv/bin/python bench/storage_bench.py [--hops 3] [--variants p2p,tls,tunnelled] [--trace]

``--trace`` breaks vmferry plain's steps down as ``bench/migrate_bench.py --trace`` does
(QMP commands, status writes, QEMU launch, waits, per step; median per hop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.pki import init_pki
from vmferry.testguest import (
    GuestDisk,
    Heartbeat,
    check_continuity,
    guest_cmdline,
    guest_paths,
    guest_xml,
)
from vmferry.testing import Host, poll_heartbeat
from vmferry.testing.disk import (
    DISK_BLOCK,
    create_image,
    make_image_dir,
    verify_disk_image,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import BareDisk, BareQemu, bare_storage_hop, disk_argv, guest_argv
from migrate_bench import (
    _json_safe,
    _num,
    _trace_client,
    _workdir,
    daemon,
    log,
    render_trace,
    start_daemon,
    stop_daemon,
    summary,
    trace_breakdown,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "storage.json"
#: The issue's targets: vmferry within 1.2x of the floor; TLS and tunnel throughput ratios.
TARGET_RATIO = 1.2
TARGET_TLS = 0.7
TARGET_TUNNEL = 0.8
MIB = 1 << 20
DISK_NODE = "vda"


@dataclass(frozen=True)
class Shape:
    memory_mib: int = 128
    stamp_mib: int = 32
    dirty_mib_s: float = 4
    hb_ms: int = 500
    disk_mib: int = 1024
    data_mib: int = 256
    disk_mib_s: float = 1
    verify_mib_s: float = 4

    @property
    def blocks(self) -> int:
        return self.data_mib * MIB // DISK_BLOCK

    def disk(self, image: Path) -> GuestDisk:
        return GuestDisk(
            file=str(image),
            format="qcow2",
            blocks=self.blocks,
            mib_s=self.disk_mib_s,
            verify_mib_s=self.verify_mib_s,
            host_init=True,  # the image is stamped before boot (stamped_image)
        )


@dataclass(frozen=True)
class Variant:
    """One way vmferry moves the guest: the flags on top of ``--live --copy-storage-all``."""

    name: str
    flags: MigrateFlags
    #: Compared with this variant (``None``: with the floor).
    baseline: str | None
    target: float
    #: Daemon config appended to its [migration] section (e.g. ``tls = "on"``).
    extra_config: str = ""
    #: The daemons need the cluster PKI (``[tls] pki_dir``; made for the run).
    pki: bool = False
    #: p2p to the destination's mutual-TLS URI rather than its unix socket (the tunnel
    #: travels inside the daemons' own connection).
    tls_peer: bool = False


def _variants() -> dict[str, Variant]:
    """
    The variants this vmferry can run: plain and p2p always; TLS and tunnelled once
    ``MigrateFlags`` has them (TLS against plain, tunnelled against direct p2p).
    """
    p2p = MigrateFlags.PEER2PEER
    out = {
        "plain": Variant("plain", MigrateFlags(0), None, TARGET_RATIO),
        "p2p": Variant("p2p", p2p, None, TARGET_RATIO),
    }
    tls = getattr(MigrateFlags, "TLS", None)
    if tls is not None:
        out["tls"] = Variant("tls", tls, "plain", TARGET_TLS, pki=True)
    tunnelled = getattr(MigrateFlags, "TUNNELLED", None)
    if tunnelled is not None:
        out["tunnelled"] = Variant(
            "tunnelled", tunnelled | p2p, "p2p", TARGET_TUNNEL, pki=True, tls_peer=True
        )
    return out


VARIANTS = _variants()


# -- the paths -----------------------------------------------------------------------------------


async def _beat(
    read: Callable[[], Awaitable[str]], after: Heartbeat | None, timeout: float
) -> Heartbeat:
    return await poll_heartbeat(read, after=after, timeout=timeout, interval=0.05)


async def _after_hop(read: Callable[[], Awaitable[str]], last: Heartbeat | None) -> Heartbeat:
    """The destination's next heartbeat: it continues *last*, memory and disk intact."""
    assert last is not None
    after = await _beat(read, last, 30)
    check_continuity(last, after)
    if after.disk is None or not after.disk.ready:
        raise AssertionError(f"the guest's disk writer is not running after the hop: {after}")
    return after


@dataclass
class VmferryPath:
    """A guest under vmferry, hopping between two daemons with its disk."""

    hosts: tuple[AsyncClient, AsyncClient]
    dests: tuple[str, str]
    dirs: tuple[Path, Path]
    variant: Variant
    shape: Shape
    here: int = 0
    boot: Heartbeat | None = None
    last: Heartbeat | None = None
    hops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"bench-{self.variant.name}"

    @property
    def label(self) -> str:
        return f"vmferry {self.variant.name}"

    def image(self, side: int) -> Path:
        return self.dirs[side] / f"{self.name}.qcow2"

    def xml(self, side: int) -> str:
        s = self.shape
        return guest_xml(
            self.name,
            memory_mib=s.memory_mib,
            stamp_mib=s.stamp_mib,
            dirty_mib_s=s.dirty_mib_s,
            hb_ms=s.hb_ms,
            # Fixed: the destination's XML (its own disk directory) must match the source's.
            uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name)),
            disk=s.disk(self.image(side)),
        )

    async def _console(self) -> str:
        return (await self.hosts[self.here].console(self.name)).data

    async def boot_guest(self, template: Path, timeout: float) -> None:
        _copy_image(template, self.image(0))
        await self.hosts[0].create(self.xml(0))
        self.boot = self.last = await _beat(self._console, None, timeout)

    async def hop(self) -> None:
        src, dst = self.hosts[self.here], self.hosts[1 - self.here]
        flags = MigrateFlags.LIVE | MigrateFlags.NON_SHARED_DISK | self.variant.flags
        params = MigrationParams(dest_xml=self.xml(1 - self.here))
        t_start = time.time()
        t0 = time.perf_counter()
        report: MigrationReport
        if flags & MigrateFlags.PEER2PEER:
            report = await migrate_p2p(src, self.dests[1 - self.here], self.name, flags, params)
        else:
            report = await migrate(src, dst, self.name, flags, params)
        wall = time.perf_counter() - t0
        t_end = time.time()
        old = self.image(self.here)
        self.here = 1 - self.here
        old.unlink()  # the next hop back creates it anew, as the floor does
        stats = report.stats
        self.hops.append(
            {
                "t_start": t_start,
                "t_end": t_end,
                "wall_s": wall,
                "steps_s": dict(report.steps),
                "downtime_ms": _num(stats.get("downtime_ms")),
                "qemu_total_ms": _num(stats.get("total_time_ms")),
                "disk_bytes": _num(stats.get("disk_total")),
                # the source's mirrors: first start until every one in sync
                "mirror_s": _num(stats.get("disk_sync_ms")) / 1000,
                # With storage, data_* is memory and disk together.
                "ram_transferred": _num(stats.get("data_processed"))
                - _num(stats.get("disk_processed")),
            }
        )

    async def verify(self) -> None:
        self.last = await _after_hop(self._console, self.last)

    async def stop(self) -> Path:
        """Destroy the guest; the image it ended on."""
        for client in self.hosts:
            with contextlib.suppress(VmferryError):
                await client.destroy(self.name)
        return self.image(self.here)


@dataclass
class FloorPath:
    """The same guest under bare QEMU, hopping between fresh QEMU processes with its disk."""

    workdir: Path
    shape: Shape
    qemu: BareQemu | None = None
    console: Path | None = None
    here: int = 0
    count: int = 0
    boot: Heartbeat | None = None
    last: Heartbeat | None = None
    hops: list[dict[str, Any]] = field(default_factory=list)

    label = "bare QEMU"

    def image(self, side: int) -> Path:
        return self.workdir / f"disk{side}.qcow2"

    def _argv(self, tag: str, side: int, *, incoming: bool) -> tuple[list[str], Path, Path]:
        kernel, initrd = guest_paths()
        s = self.shape
        qmp, console = self.workdir / f"{tag}.qmp", self.workdir / f"{tag}.con"
        cmdline = guest_cmdline(
            stamp_mib=s.stamp_mib,
            dirty_mib_s=s.dirty_mib_s,
            hb_ms=s.hb_ms,
            disk=s.disk(self.image(side)),
        )
        argv = guest_argv(
            kernel,
            initrd,
            cmdline,
            qmp=qmp,
            console=console,
            memory_mib=s.memory_mib,
            incoming=incoming,
            extra=disk_argv(BareDisk(self.image(side), node=DISK_NODE)),
        )
        return argv, qmp, console

    async def _console(self) -> str:
        assert self.console is not None
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def boot_guest(self, template: Path, timeout: float) -> None:
        _copy_image(template, self.image(0))
        argv, qmp, self.console = self._argv("q0", 0, incoming=False)
        self.qemu = BareQemu(argv, qmp, log=self.workdir / "q0.log")
        await self.qemu.start()
        await self.qemu.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        self.boot = self.last = await _beat(self._console, None, timeout)

    async def hop(self) -> None:
        assert self.qemu is not None
        self.count += 1
        tag, there = f"q{self.count}", 1 - self.here
        argv, qmp, console = self._argv(tag, there, incoming=True)
        target = BareDisk(self.image(there), node=DISK_NODE)
        dst, result = await bare_storage_hop(
            self.qemu,
            argv,
            qmp,
            [(target, self.shape.disk_mib * MIB)],
            log=self.workdir / f"{tag}.log",
        )
        old = self.image(self.here)
        self.qemu, self.console, self.here = dst, console, there
        old.unlink()
        hop = {k: v for k, v in asdict(result).items() if k != "info"}
        hop["wall_s"] = result.total_s
        hop["downtime_ms"] = _num(result.qemu_downtime_ms)
        self.hops.append(hop)

    async def verify(self) -> None:
        self.last = await _after_hop(self._console, self.last)

    async def stop(self) -> Path:
        if self.qemu is not None:
            await self.qemu.stop()
        return self.image(self.here)


Path_ = VmferryPath | FloorPath


def _copy_image(template: Path, dest: Path) -> None:
    shutil.copyfile(template, dest)
    shutil.copystat(template, dest)
    st = template.stat()
    os.chown(dest, st.st_uid, st.st_gid)


# -- the report ----------------------------------------------------------------------------------


def _ms(s: dict[str, float], scale: float = 1000.0) -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['median'] * scale:8.0f} ({s['min'] * scale:.0f}-{s['max'] * scale:.0f})"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def build_result(
    args: argparse.Namespace, shape: Shape, paths: Sequence[Path_], checked: dict[str, str]
) -> dict[str, Any]:
    keys = ("wall_s", "downtime_ms", "qemu_total_ms", "disk_bytes", "ram_transferred")
    floor_keys = (
        "paused_ms",
        "create_s",
        "spawn_s",
        "nbd_s",
        "mirror_s",
        "migrate_s",
        "switchover_s",
        "resume_s",
        "kill_s",
    )
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hops": args.hops,
        "variants": [p.variant.name for p in paths if isinstance(p, VmferryPath)],
        "guest": {**asdict(shape), "blocks": shape.blocks},
        "cpus": os.cpu_count(),
        "paths": {},
        "ratios": {},
        "checked": checked,
    }
    for p in paths:
        extra = floor_keys if isinstance(p, FloorPath) else ()
        out["paths"][p.label] = {
            "summary": {k: summary([_num(h.get(k)) for h in p.hops]) for k in (*keys, *extra)},
            "hops": p.hops,
        }
        if isinstance(p, VmferryPath):
            names = list(p.hops[0]["steps_s"]) if p.hops else []
            out["paths"][p.label]["steps"] = {
                n: summary([_num(h["steps_s"].get(n)) for h in p.hops])["median"] for n in names
            }
    medians = {label: v["summary"]["wall_s"]["median"] for label, v in out["paths"].items()}
    for p in paths:
        if not isinstance(p, VmferryPath):
            continue
        base = FloorPath.label if p.variant.baseline is None else f"vmferry {p.variant.baseline}"
        # vmferry vs floor: time ratio (lower is better); variant vs plain: throughput
        # ratio (higher is better), as the issue states the TLS and tunnel targets.
        if p.variant.baseline is None:
            r = _ratio(medians[p.label], medians[base])
            ok = r <= p.variant.target
        else:
            r = _ratio(medians[base], medians[p.label])
            ok = r >= p.variant.target
        base_path = next(b for b in paths if b.label == base)
        pairs = _pair_ratios(p.hops, base_path.hops, time_ratio=p.variant.baseline is None)
        out["ratios"][f"{p.label} / {base}"] = {
            "ratio": r,
            "target": p.variant.target,
            "met": ok,
            "pairs": pairs,
            "pairs_summary": summary(pairs),
        }
    plain = next(p for p in paths if isinstance(p, VmferryPath) and p.variant.name == "plain")
    floor = next((p for p in paths if isinstance(p, FloorPath)), None)
    if floor is not None:
        out["parts"] = {
            name: {
                "vmferry": summary([vm(h) for h in plain.hops]),
                "floor": summary([fl(h) for h in floor.hops]),
            }
            for name, (vm, fl) in PARTS.items()
        }
    return out


def _pair_ratios(
    hops: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], *, time_ratio: bool
) -> list[float]:
    """Hop i of a path against hop i of its baseline: the same round, one right after the other.

    A time ratio (path / baseline) against the floor, a throughput ratio (baseline / path)
    against another vmferry variant, as in the ratio of medians.
    """
    out = []
    for a, b in zip(hops, base, strict=False):
        mine, theirs = _num(a.get("wall_s")), _num(b.get("wall_s"))
        out.append(_ratio(mine, theirs) if time_ratio else _ratio(theirs, mine))
    return out


def _step(h: dict[str, Any], *names: str) -> float:
    return sum(_num(h["steps_s"].get(n)) for n in names)


def _rest(h: dict[str, Any]) -> float:
    """Wall less the copy: the mirrors until in sync, and QEMU's migration (its total_time)."""
    return _num(h.get("wall_s")) - _num(h.get("mirror_s")) - _num(h.get("qemu_total_ms")) / 1000


def _copy(h: dict[str, Any]) -> float:
    return _num(h.get("mirror_s")) + _num(h.get("qemu_total_ms")) / 1000


#: Parts of a hop that do not depend on how fast QEMU copied (vmferry plain's, the floor's),
#: seconds per hop; the last is the copy itself, for reference.
PARTS: dict[str, tuple[Callable[[dict[str, Any]], float], Callable[[dict[str, Any]], float]]] = {
    "set-up: Prepare | create+spawn+NBD": (
        lambda h: _step(h, "prepare"),
        lambda h: _num(h["create_s"]) + _num(h["spawn_s"]) + _num(h["nbd_s"]),
    ),
    "tail: Finish+Confirm | NBD stop+cont+kill": (
        lambda h: _step(h, "finish", "confirm"),
        lambda h: _num(h["resume_s"]) + _num(h["kill_s"]),
    ),
    "wall - mirror - migrate": (_rest, _rest),
    "the copy, for reference: mirror+migrate": (_copy, _copy),
}


def render(result: dict[str, Any]) -> str:
    g = result["guest"]
    lines = [
        f"{result['hops']} hops each, interleaved; guest {g['memory_mib']} MiB"
        f" RAM ({g['stamp_mib']} MiB stamped, dirtying {g['dirty_mib_s']:g} MiB/s), disk"
        f" {g['disk_mib']} MiB qcow2 holding {g['data_mib']} MiB, writing"
        f" {g['disk_mib_s']:g} MiB/s during the hops; TCG",
        "",
        f"{'median ms (min-max)':<22}" + "".join(f"{label:>24}" for label in result["paths"]),
    ]
    rows = [
        ("wall per hop", "wall_s", 1000.0),
        ("QEMU downtime", "downtime_ms", 1.0),
        ("QEMU total_time", "qemu_total_ms", 1.0),
    ]
    for title, key, scale in rows:
        cells = [_ms(p["summary"][key], scale) for p in result["paths"].values()]
        lines.append(f"{title:<22}" + "".join(f"{c:>24}" for c in cells))
    for title, key in (("RAM sent, MiB", "ram_transferred"), ("disk copied, MiB", "disk_bytes")):
        cells = [f"{p['summary'][key]['median'] / MIB:.0f}" for p in result["paths"].values()]
        lines.append(f"{title:<22}" + "".join(f"{c:>24}" for c in cells))
    floor = result["paths"].get(FloorPath.label)
    if floor is not None:
        parts = ("create_s", "spawn_s", "nbd_s", "mirror_s", "migrate_s", "switchover_s")
        lines.append(
            "floor steps (median ms): "
            + ", ".join(
                f"{k.removesuffix('_s')} {floor['summary'][k]['median'] * 1000:.0f}" for k in parts
            )
            + f"; guest paused (STOP to cont) {floor['summary']['paused_ms']['median']:.0f}"
        )
    for label, p in result["paths"].items():
        steps = p.get("steps")
        if steps:
            lines.append(
                f"{label} steps (median ms): "
                + ", ".join(f"{k} {v * 1000:.0f}" for k, v in steps.items())
            )
    lines.append("")
    for what, r in result["ratios"].items():
        verdict = "met" if r["met"] else "NOT met"
        kind = "time" if what.endswith(FloorPath.label) else "throughput"
        lines.append(
            f"{what}: {kind} ratio of the medians {r['ratio']:.2f}"
            f" (target {r['target']}: {verdict})"
        )
        ps = r["pairs_summary"]
        if ps["n"]:
            each = " ".join(f"{x:.2f}" for x in r["pairs"])
            lines.append(
                f"  per pair (round by round): {each}; median {ps['median']:.2f}"
                f" (min-max {ps['min']:.2f}-{ps['max']:.2f}, spread {ps['max'] - ps['min']:.2f})"
            )
    copy_parts = result.get("parts")
    if copy_parts:
        lines += [
            "",
            "the parts of a hop (median ms per hop, min-max; all but the last leave the copy out):",
            f"{'':<42}{'vmferry plain':>20}{'bare QEMU':>20}{'vmferry - floor':>17}",
        ]
        for name, part in copy_parts.items():
            vm, fl = part["vmferry"], part["floor"]
            diff = (vm["median"] - fl["median"]) * 1000
            cell = f"{diff:+.0f}" if not math.isnan(diff) else "n/a"
            lines.append(f"{name:<42}{_ms(vm):>20}{_ms(fl):>20}{cell:>17}")
    for label, text in result["checked"].items():
        lines.append(f"{label}: {text}")
    load = result["loadavg"]
    lines.append(f"load average before/after: {load[0]:.1f} / {load[1]:.1f}")
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------


def _wanted(spec: str) -> list[str]:
    """The variants to run: plain, those asked for, and what those are compared with."""
    wanted = ["plain"]
    for name in (v.strip() for v in spec.split(",")):
        if not name:
            continue
        if name not in VARIANTS:
            raise SystemExit(
                f"variant {name!r} not available in this vmferry (have: {', '.join(VARIANTS)})"
            )
        for v in (VARIANTS[name].baseline, name):
            if v is not None and v not in wanted:
                wanted.append(v)
    return wanted


def _with_pki(daemons: Sequence[Host], pki: Path) -> None:
    """Mutual TLS for the daemons: the cluster PKI and a TLS listener on their 16th port."""
    init_pki(pki)
    for host in daemons:
        host.pki_dir, host.port_span = pki, 14
        host.tls_port = host.port_min + 15


def stamped_image(work: Path, shape: Shape) -> Path:
    """The template every guest's disk starts from: data_mib stamped at generation 1."""
    return create_image(
        work / "template.qcow2", shape.disk_mib * MIB, fmt="qcow2", stamp_blocks=shape.blocks
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = Shape(
        memory_mib=args.memory_mib,
        stamp_mib=args.stamp_mib,
        disk_mib=args.disk_mib,
        data_mib=args.data_mib,
        disk_mib_s=args.disk_mib_s,
    )
    wanted = _wanted(args.variants)
    with _workdir(args.keep) as work:
        images = make_image_dir()
        dirs = (images / "h0", images / "h1")
        checked: dict[str, str] = {}
        try:
            for d in dirs:
                d.mkdir()
                shutil.chown(d, "vmferry-qemu", "vmferry-qemu")
            (work / "floor").mkdir()
            log(f"stamping a {shape.data_mib} MiB template disk")
            template = stamped_image(images, shape)
            extra = "".join(VARIANTS[v].extra_config for v in wanted)
            base = random.randrange(40000, 48000, 32)
            daemons: list[Host] = []
            for i in range(2):
                traced = work / f"trace{i}.json" if args.trace else None
                host = daemon(
                    work / f"h{i}", f"sbench{i}", base + 16 * i, args.daemon_log_level, traced
                )
                host.image_roots = [dirs[i]]
                host.extra_config = extra
                daemons.append(host)
            if any(VARIANTS[v].pki or VARIANTS[v].tls_peer for v in wanted):
                _with_pki(daemons, work / "pki")
            # Direct and tunnelled p2p alike reach the peer over its mutual-TLS listener.
            tls_peer = any(VARIANTS[v].tls_peer for v in wanted)
            dests = tuple(h.tls_uri if tls_peer else h.uri for h in daemons)
            fl = FloorPath(work / "floor", shape)
            client_records: list[Any] = []
            if args.trace:
                _trace_client(client_records)
            async with contextlib.AsyncExitStack() as stack:
                for h in daemons:
                    stack.push_async_callback(stop_daemon, h)
                await asyncio.gather(*(start_daemon(h) for h in daemons))
                clients = tuple(
                    [await stack.enter_async_context(AsyncClient(h.uri)) for h in daemons]
                )
                vms = [
                    VmferryPath(
                        (clients[0], clients[1]), (dests[0], dests[1]), dirs, VARIANTS[v], shape
                    )
                    for v in wanted
                ]
                paths: list[Path_] = [*vms, fl]
                for p in paths:
                    stack.push_async_callback(p.stop)
                log(f"booting {len(paths)} guests")
                for p in paths:  # one at a time: booting is what loads TCG the most
                    await p.boot_guest(template, 90)
                for i in range(args.hops):
                    order = paths if i % 2 == 0 else paths[::-1]
                    for p in order:
                        await p.hop()
                        await p.verify()
                        log(f"hop {i + 1}/{args.hops} {p.label:<22} {p.hops[-1]['wall_s']:7.2f} s")
                for p in paths:
                    final = await p.stop()
                    report = await asyncio.to_thread(verify_disk_image, final, blocks=shape.blocks)
                    report.check()
                    assert p.boot is not None and p.last is not None and p.last.disk is not None
                    checked[p.label] = (
                        f"boot {p.boot.boot} seq {p.boot.seq}->{p.last.seq}, memory errors 0, disk"
                        f" blocks written {p.last.disk.written} verified {p.last.disk.verified}"
                        f" errors 0; final image: {report.stamped} blocks well-formed"
                        f" (max generation {report.max_gen})"
                    )
            result = build_result(args, shape, paths, checked)
            if args.trace:  # the daemons wrote their records on exit
                traces = [json.loads((work / f"trace{i}.json").read_text()) for i in range(2)]
                records = [
                    [(float(a), float(b), str(c), str(e)) for a, b, c, e in t] for t in traces
                ]
                plain = next(p for p in vms if p.variant.name == "plain")
                result["trace"] = trace_breakdown(plain.hops, client_records, records)
            return result
        finally:
            shutil.rmtree(images, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hops", type=int, default=3, help="migrations per path (default 3)")
    p.add_argument(
        "--variants",
        default="",
        help=f"more vmferry variants beside plain, comma-separated (have: {', '.join(VARIANTS)})",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    p.add_argument("--memory-mib", type=int, default=128)
    p.add_argument("--stamp-mib", type=int, default=32)
    p.add_argument("--disk-mib", type=int, default=1024)
    p.add_argument("--data-mib", type=int, default=256)
    p.add_argument("--disk-mib-s", type=float, default=1, help="guest disk writes during hops")
    p.add_argument("--enforce", action="store_true", help="exit 1 when a ratio misses its target")
    p.add_argument("--daemon-log-level", default="info", choices=["debug", "info", "warning"])
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, consoles)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="break vmferry plain's steps down (migrate_bench's tracer; costs a little: quote a"
        " plain run)",
    )
    args = p.parse_args(argv)
    if args.hops < 1 or args.data_mib > args.disk_mib:
        p.error("--hops must be at least 1 and --data-mib at most --disk-mib")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    print(f"\n(bench took {result['bench_s']:.0f} s; results in {args.json})")
    if args.enforce and not all(r["met"] for r in result["ratios"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
