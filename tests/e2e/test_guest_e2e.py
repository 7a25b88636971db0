"""
The test guest really detects broken memory and survives a plain QEMU live
migration.

The QEMU tests boot real guests under TCG (``make guest`` builds them).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from vmferry.testguest import (
    Heartbeat,
    check_continuity,
    count_errors_lines,
    guest_cmdline,
    guest_paths,
    last_heartbeat,
    parse_heartbeats,
)
from vmferry.testing.heartbeat import HEARTBEAT_TIMEOUT_S

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from floor import BareQemu, bare_migrate, guest_argv

T = TypeVar("T")


# --- console protocol ------------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _argv(workdir: Path, tag: str, cmdline: str, *, incoming: bool = False) -> list[str]:
    kernel, initrd = guest_paths()
    return guest_argv(
        kernel,
        initrd,
        cmdline,
        qmp=workdir / f"{tag}.qmp",
        console=workdir / f"{tag}.con",
        incoming=incoming,
    )


def _console(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def _wait_console(path: Path, pred: Callable[[str], T | None], within: float) -> T:
    """Poll a console file until *pred* returns something other than None/False."""
    deadline = time.monotonic() + within
    while True:
        text = _console(path)
        got = pred(text)
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s; console {path}:\n{text[-2000:]}")
        await asyncio.sleep(0.05)


def _beats_after(n: int) -> Callable[[str], list[Heartbeat] | None]:
    def pred(text: str) -> list[Heartbeat] | None:
        beats = parse_heartbeats(text)
        return beats if len(beats) >= n else None

    return pred


@pytest.mark.qemu
async def test_boot_heartbeats_grow_without_errors(workdir: Path) -> None:
    cmd = guest_cmdline(stamp_mib=32, dirty_mib_s=4, hb_ms=250)
    con = workdir / "g.con"
    t0 = time.monotonic()
    async with BareQemu(_argv(workdir, "g", cmd), workdir / "g.qmp", log=workdir / "g.log"):
        await _wait_console(con, _beats_after(1), HEARTBEAT_TIMEOUT_S)
        boot_s = time.monotonic() - t0
        beats = await _wait_console(con, _beats_after(5), 10)
    text = _console(con)
    print(f"\nguest boot: first heartbeat {boot_s:.2f}s after spawn (guest up_ms={beats[0].up_ms})")
    assert "VMFERRY-READY boot=" + beats[0].boot in text
    assert text.index("VMFERRY-READY") < text.index("VMFERRY-HB")
    assert "VMFERRY-FATAL" not in text
    assert count_errors_lines(text) == 0
    assert len({b.boot for b in beats}) == 1
    assert [b.seq for b in beats] == list(range(1, len(beats) + 1))
    for a, b in itertools.pairwise(beats):
        assert b.verified > a.verified and b.dirtied > a.dirtied and b.up_ms > a.up_ms
        check_continuity(a, b)
    # 32 MiB = 8192 pages verified once a second: the last 4 beats span ~1 s.
    assert beats[-1].verified - beats[1].verified > 4000


@pytest.mark.qemu
async def test_corrupt_after_is_detected(workdir: Path) -> None:
    cmd = guest_cmdline(
        stamp_mib=8, dirty_mib_s=1, hb_ms=250, extra_cmdline="vmferry.corrupt_after=1"
    )
    con = workdir / "g.con"
    async with BareQemu(_argv(workdir, "g", cmd), workdir / "g.qmp", log=workdir / "g.log"):
        first = (await _wait_console(con, _beats_after(1), 20))[0]

        def bad(text: str) -> Heartbeat | None:
            hb = last_heartbeat(text)
            return hb if hb is not None and hb.errors > 0 else None

        broken = await _wait_console(con, bad, 10)
    text = _console(con)
    assert "VMFERRY-CORRUPTED page=" in text
    assert count_errors_lines(text) >= 1
    assert broken.errors == 1  # one page corrupted, found once, then repaired
    with pytest.raises(AssertionError, match="wrong content"):
        check_continuity(first, broken)


@pytest.mark.qemu
async def test_bare_live_migration_keeps_guest_running(workdir: Path) -> None:
    cmd = guest_cmdline(stamp_mib=32, dirty_mib_s=4, hb_ms=250)
    src_con, dst_con = workdir / "src.con", workdir / "dst.con"
    async with BareQemu(
        _argv(workdir, "src", cmd), workdir / "src.qmp", log=workdir / "src.log"
    ) as src:
        await _wait_console(src_con, _beats_after(2), 20)
        async with BareQemu(
            _argv(workdir, "dst", cmd, incoming=True), workdir / "dst.qmp", log=workdir / "dst.log"
        ) as dst:
            result = await bare_migrate(src.qmp, dst.qmp, limit_s=20)
            before = last_heartbeat(_console(src_con))
            assert before is not None
            status = await src.execute("query-status")
            assert status["status"] == "postmigrate"
            after = (await _wait_console(dst_con, _beats_after(4), 10))[-1]
            dst_status = await dst.execute("query-status")
    print(
        f"\nbare migration: {result.total_s:.2f}s to destination running "
        f"(QEMU total {result.qemu_total_ms} ms, downtime {result.downtime_ms} ms, "
        f"{(result.ram_transferred or 0) >> 20} MiB sent)"
    )
    assert dst_status["status"] == "running"
    assert result.info["status"] == "completed"
    check_continuity(before, after)
    first_dst = parse_heartbeats(_console(dst_con))[0]
    # The destination's console picks up where the source's stopped: no reboot, no gap.
    assert first_dst.boot == before.boot
    assert before.seq < first_dst.seq <= before.seq + 2
    assert after.verified > before.verified and after.dirtied > before.dirtied
    assert count_errors_lines(_console(dst_con)) == 0
    # The source stopped at switchover: nothing new after the heartbeat we read.
    assert last_heartbeat(_console(src_con)) == before
