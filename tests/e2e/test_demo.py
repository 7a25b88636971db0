"""``make demo`` (``python -m vmferry.demo``) as a user runs it: exit status and what it shows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

DEMO_TIMEOUT_S = 120


@pytest.fixture
def deep_workdir() -> Iterator[Path]:
    """A work dir too deep for unix sockets, so the demo must move them to /tmp."""
    root = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    try:
        yield root / ("d" * 90)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_demo(workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmferry.demo", "--workdir", str(workdir), *extra]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: the demo then stops the daemons and guests it started.
            proc.terminate()
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"the demo took over {DEMO_TIMEOUT_S} s:\n{out}{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def running_with(marker: str) -> list[str]:
    """Command lines of live processes that mention *marker*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if marker in cmdline and "State:\tZ" not in status:
            found.append(cmdline)
    return found


def short_dirs(output: str) -> set[str]:
    return set(re.findall(r"unix://(/tmp/vfdemo[^/\s]+)/", output))


def test_demo_passes_and_leaves_nothing_running(deep_workdir: Path) -> None:
    done = run_demo(deep_workdir)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for line in (
        "state=running reason=booted",
        "suspended: state=paused reason=user",
        "resumed:   state=running reason=unpaused",
        "heartbeat OK after resume",
        "heartbeat OK after restart",
        "new vmferryd re-attached: state=running",
        "demo-host1 -> demo-host2 (v3, client-managed)",
        "demo-host2 -> demo-host1 (v3, client-managed)",
        "demo-host1 -> demo-host2 (peer-to-peer)",
        "list --all",
        "'demo-vm' destroyed and undefined on demo-host2",
        "demo finished: all checks passed",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    # Three hop tables, each with the same boot id and no errors.
    boots = re.findall(r"boot ([0-9a-f]{16}) \(same\), seq (\d+) -> (\d+), errors=0", out)
    assert len(boots) == 3, out
    assert len({boot for boot, _, _ in boots}) == 1
    assert all(int(after) > int(before) for _, before, after in boots)
    # The CLI's listing shows the guest running on host 2.
    assert re.search(r"^\s+\d+\s+demo-vm\s+running$", out, re.M), out
    # Sockets went to a short /tmp dir, which is gone again; the state came back.
    (short,) = short_dirs(out)
    assert not Path(short).exists()
    assert running_with(str(deep_workdir)) == [] and running_with(short) == []
    console_log = deep_workdir / "host2" / "state" / "log" / "demo-vm.console.log"
    assert "VMFERRY-HB" in console_log.read_text()


def test_demo_fails_on_a_memory_error(deep_workdir: Path) -> None:
    # The guest corrupts one of its own pages at once: the first checks must catch it.
    # No re-stamping (dirty_mib_s=0, the last value wins): it could repair the page unseen.
    extra = "vmferry.corrupt_after=0 vmferry.dirty_mib_s=0"
    done = run_demo(deep_workdir, "--guest-cmdline", extra)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "demo FAILED" in out, out
    assert "bad page" in out or "memory was corrupted" in out, out
    assert "demo finished" not in out
    for short in short_dirs(out):
        assert not Path(short).exists()
        assert running_with(short) == []
    assert running_with(str(deep_workdir)) == []
