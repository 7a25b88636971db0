"""Running ``qemu-img``: a fixed program, with arguments this package builds.

Nothing a client sends becomes a program or an option here; file names are
pool paths the caller validated, passed after ``--``-free positional slots
that ``qemu-img`` cannot mistake for options (they are absolute paths).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from vmferry.errors import ErrorCode, VmferryError

QEMU_IMG = "qemu-img"
_TIMEOUT = 60.0


def _run(args: list[str], what: str) -> str:
    try:
        done = subprocess.run(
            [QEMU_IMG, *args],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"cannot {what}: {QEMU_IMG} is not installed (apt-get install qemu-utils)",
        ) from None
    except subprocess.TimeoutExpired:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"cannot {what}: {QEMU_IMG} took over {_TIMEOUT:.0f} s"
        ) from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["exit status " + str(done.returncode)])[-1]
        full = "No space left on device" in detail or "Disk quota exceeded" in detail
        code = ErrorCode.STORAGE_FULL if full else ErrorCode.OPERATION_FAILED
        raise VmferryError(code, f"cannot {what}: {detail}")
    return done.stdout


def create(path: str, fmt: str, capacity: int, backing: tuple[str, str] | None = None) -> None:
    """Create an image at *path*; *backing*: (name relative to *path*'s directory, format)."""
    args = ["create", "-q", "-f", fmt]
    if fmt == "qcow2":
        # No preallocation: a fresh qcow2 holds only its metadata.
        options = ["preallocation=off"]
        if backing is not None:
            # A relative name: the chain means the same in every host's pool of that name.
            options += [f"backing_file={backing[0]}", f"backing_fmt={backing[1]}"]
        args += ["-o", ",".join(options)]
    args += [path, str(capacity)]
    _run(args, f"create volume {path}")


def info(path: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` of *path* opened as *fmt*, without opening any backing file.

    ``-U``: a running guest's image is locked; reading its header is still safe.
    """
    out = _run(["info", "-U", "--output=json", "-f", fmt, path], f"read image {path}")
    data = json.loads(out)
    if not isinstance(data, dict):
        raise VmferryError(ErrorCode.OPERATION_FAILED, f"cannot read image {path}: bad output")
    return data
