"""vmferry.failpoints: parsing, the three actions, and a daemon that refuses bad ones."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vmferry import failpoints
from vmferry.errors import ErrorCode, VmferryError
from vmferry.failpoints import ENV_VAR, IO_POINTS, POINTS, STORAGE_POINTS, failpoint


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.configure("")


def test_points_cover_every_phase_boundary() -> None:
    for step in ("src-begin", "src-perform3", "src-perform2", "src-confirm3"):
        assert {f"{step}-before", f"{step}-after"} <= POINTS
    for step in ("dst-prepare", "dst-finish"):
        assert {f"{step}-before", f"{step}-after"} <= POINTS
    assert {"src-perform-migrating", "dst-postcopy-running"} <= POINTS
    assert set(STORAGE_POINTS) <= POINTS
    assert len(POINTS - set(IO_POINTS) - set(STORAGE_POINTS)) == 14


def test_parse() -> None:
    assert failpoints.parse("") == {}
    assert failpoints.parse(" src-begin-after=exit , dst-finish-before=hang,") == {
        "src-begin-after": "exit",
        "dst-finish-before": "hang",
    }


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("src-begin-afterr=exit", "unknown failpoint 'src-begin-afterr'"),
        ("src-begin-after", "unknown failpoint"),
        ("src-begin-after=explode", "unknown action 'explode'"),
        ("dst-prepare-before=error,nope=exit", "unknown failpoint 'nope'"),
    ],
)
def test_bad_specs_are_refused(spec: str, words: str) -> None:
    with pytest.raises(VmferryError) as err:
        failpoints.configure(spec)
    assert err.value.code == ErrorCode.INVALID_ARG
    assert words in err.value.message and ENV_VAR in err.value.message


async def test_disarmed_points_return_at_once() -> None:
    assert not failpoints.armed("src-begin-after")
    await failpoint("src-begin-after")
    failpoints.configure("dst-finish-after=error")
    await failpoint("src-begin-after")  # another point: still nothing
    assert failpoints.armed("dst-finish-after")


async def test_error_action() -> None:
    failpoints.configure("dst-finish-after=error")
    with pytest.raises(VmferryError) as err:
        await failpoint("dst-finish-after")
    assert err.value.code == ErrorCode.INTERNAL_ERROR
    assert err.value.message == "failpoint dst-finish-after hit"


async def test_hang_action_blocks_until_cancelled() -> None:
    failpoints.configure("src-perform3-before=hang")
    task = asyncio.create_task(failpoint("src-perform3-before"))
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_exit_action_kills_the_process() -> None:
    code = (
        "import asyncio\n"
        "from vmferry import failpoints\n"
        "failpoints.load_from_env()\n"
        "asyncio.run(failpoints.failpoint('src-confirm3-before'))\n"
        "print('survived')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={ENV_VAR: "src-confirm3-before=exit", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == -signal.SIGKILL
    assert "survived" not in proc.stdout
