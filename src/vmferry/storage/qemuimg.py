"""Running ``qemu-img``: a fixed program, with arguments this package builds.

Nothing a client sends becomes a program or an option here; file names are
pool paths the caller validated, passed after ``--``-free positional slots
that ``qemu-img`` cannot mistake for options (they are absolute paths).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections import OrderedDict
from typing import Any

from vmferry.errors import ErrorCode, VmferryError

QEMU_IMG = "qemu-img"
_TIMEOUT = 60.0

#: Images whose header was read lately: (path, format) -> (the file's identity then, the
#: header). A QEMU start reads every layer's header (the chain it may open); a file that
#: did not change since needs no new ``qemu-img`` process (one per layer, each start).
_HEADERS: OrderedDict[tuple[str, str], tuple[tuple[int, ...], dict[str, Any]]] = OrderedDict()
_HEADERS_MAX = 256
_HEADERS_LOCK = threading.Lock()  # callers run in threads (asyncio.to_thread)


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


def _identity(path: str) -> tuple[int, ...] | None:
    """What changes with any change of the file (data, size, owner, rename, a new inode).

    ``st_ctime`` cannot be set from user space: every write, truncate, chmod, chown or
    replacement of the file moves it (to a fine-grained time once a stat has seen it).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def header(path: str, fmt: str) -> dict[str, Any]:
    """:func:`info` for the header fields (format, backing file, data file), cached.

    Read again whenever the file's identity (:func:`_identity`) changed since the
    last read; never trust for sizes (``actual-size`` changes without a header change).
    """
    before = _identity(path)
    with _HEADERS_LOCK:
        hit = _HEADERS.get((path, fmt))
        if hit is not None and before is not None and hit[0] == before:
            _HEADERS.move_to_end((path, fmt))
            return hit[1]
    data = info(path, fmt)
    if before is not None and _identity(path) == before:  # unchanged while qemu-img read it
        _remember(path, fmt, before, data)
    return data


def remember_created(path: str, fmt: str, capacity: int) -> None:
    """Record the header of the image just created at *path* without a backing file.

    Called by whoever made it (after its last chown/rename), so the QEMU start
    that follows reads no header: the file is as ``qemu-img create`` left it.
    """
    now = _identity(path)
    if now is not None:
        _remember(path, fmt, now, {"format": fmt, "virtual-size": capacity, "filename": path})


def _remember(path: str, fmt: str, ident: tuple[int, ...], data: dict[str, Any]) -> None:
    with _HEADERS_LOCK:
        _HEADERS[(path, fmt)] = (ident, data)
        _HEADERS.move_to_end((path, fmt))
        while len(_HEADERS) > _HEADERS_MAX:
            _HEADERS.popitem(last=False)
