"""
Starting QEMU and finding it again

`launch()` starts a QEMU and returns once its QMP monitor is connected,
or fails with QEMU's own complaint from its log. `reattach()` is the
daemon-restart path: it re-finds a QEMU by pid and connects to its QMP
socket again (QEMU's QMP server takes a new client once the old one is
gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from vmferry import trace
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.confine import PassedFiles, QemuUser
from vmferry.qemu.monitor import Monitor
from vmferry.qemu.process import QemuProcess

logger = logging.getLogger(__name__)

# Polling for the QMP socket starts fast (QEMU usually binds it within tens of
# milliseconds) and backs off; each wait also ends at once if QEMU exits.
# QEMU creates its QMP socket 15-35 ms after exec; a stat() every few ms costs nothing
# while a long back-off would add its whole step to every start.
_POLL_FIRST = 0.002
_POLL_MAX = 0.005
# How much of QEMU's log an error message quotes.
_LOG_TAIL_LINES = 5
_LOG_TAIL_BYTES = 8192


async def launch(
    argv: list[str],
    *,
    qmp_socket: Path,
    log_path: Path,
    name: str,
    timeout: float = 30.0,
    user: QemuUser | None = None,
    passed: PassedFiles | None = None,
) -> tuple[QemuProcess, Monitor]:
    """
    Start QEMU and connect to its QMP monitor.

    *argv* must make QEMU listen on *qmp_socket* as a QMP server
    (``-chardev socket,path=...,server=on,wait=off -mon ...,mode=control``).
    A stale socket file left by a previous run is removed first.

    With *passed*, the daemon has bound *qmp_socket* already and QEMU gets
    the listening descriptor (``-chardev socket,fd=N``): the monitor is
    connected at once, with no polling for the socket to appear. The
    daemon's copies of the passed descriptors are closed here.

    :param timeout: Seconds until the monitor must be connected.
    :param user: run QEMU as this user.
    :raise VmferryError: ``QEMU_FAILED`` with the end of QEMU's log when
        QEMU exits early, or when its monitor is not up within *timeout*;
        QEMU is killed before this is raised.
    """
    started = time.monotonic()
    if passed is None:
        _unlink(qmp_socket)
    try:
        with trace.span("qemu spawn"):
            proc = await QemuProcess.spawn(
                argv,
                log_path=log_path,
                user=user,
                pass_fds=tuple(passed.fds) if passed is not None else (),
            )
    except VmferryError as err:
        raise _failed(name, err.message) from err
    finally:
        if passed is not None:
            passed.close()  # QEMU holds them now; our copies would keep a dead QEMU's socket up
    try:
        if passed is not None:
            monitor = await _connect_passed(proc, qmp_socket, name, timeout)
        else:
            monitor = await _connect_when_ready(proc, qmp_socket, name, timeout)
    except BaseException as err:
        await proc.kill()
        _unlink(qmp_socket)
        if isinstance(err, _StartFailure):
            tail = _log_tail(proc)
            if not err.detail:  # QEMU exited: its last words say why
                raise _failed(name, tail or _exit_detail(proc)) from None
            raise _failed(name, f"{err.detail}\n{tail}" if tail else err.detail) from None
        raise
    logger.info(
        "QEMU for domain '%s' (pid %d) ready in %.3f s",
        name,
        proc.pid,
        time.monotonic() - started,
    )
    return proc, monitor


async def reattach(
    pid: int,
    *,
    uuid: str,
    qmp_socket: Path,
    name: str,
    timeout: float = 10.0,
) -> tuple[QemuProcess, Monitor] | None:
    """
    Find a running QEMU again after a daemon restart and reconnect to QMP.

    :param pid: The pid recorded in the domain's status file.
    :param uuid: The domain's UUID, which must appear on QEMU's command line.
    :return: The process and a new monitor, or None if that QEMU is gone
        (exited, or the pid now belongs to some other process).
    :raise VmferryError: When QEMU is alive but its monitor cannot be
        reached (see `Monitor.connect`); the caller decides its fate.
    """
    proc = QemuProcess.attach(pid, expect_in_cmdline=uuid)
    if proc is None:
        return None
    try:
        monitor = await Monitor.connect(qmp_socket, name=name, timeout=timeout)
    except VmferryError as err:
        # A QEMU that is dying closes the socket a moment before its pidfd fires.
        gone = await proc.wait(0 if err.code == ErrorCode.OPERATION_TIMEOUT else 0.5)
        proc.close()
        if gone:
            return None
        raise
    except BaseException:
        proc.close()
        raise
    return proc, monitor


def _failed(name: str, detail: str) -> VmferryError:
    return VmferryError(
        ErrorCode.QEMU_FAILED, f"QEMU for domain '{name}' failed to start: {detail}"
    )


class _StartFailure(Exception):
    """QEMU did not come up; *detail* says why, empty when it simply exited."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


async def _connect_when_ready(
    proc: QemuProcess,
    qmp_socket: Path,
    name: str,
    timeout: float,
) -> Monitor:
    """Wait for QEMU to create *qmp_socket*, then connect; fail if QEMU exits."""
    deadline = time.monotonic() + timeout
    timed_out = f"timed out after {timeout:g} s waiting for its QMP monitor"
    delay = _POLL_FIRST
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _StartFailure(timed_out)
        if _exists(qmp_socket):
            try:
                return await Monitor.connect(qmp_socket, name=name, timeout=left)
            except VmferryError as err:
                if err.code == ErrorCode.OPERATION_TIMEOUT:
                    raise _StartFailure(timed_out) from err
                # Bound but not listening yet, or QEMU died: the next round tells.
                if not proc.alive:
                    raise _StartFailure("") from err
        # Sleeps, but wakes up at once when QEMU exits.
        if await proc.wait(min(delay, max(left, 0.0))):
            raise _StartFailure("")
        delay = min(delay * 2, _POLL_MAX)


async def _connect_passed(
    proc: QemuProcess, qmp_socket: Path, name: str, timeout: float
) -> Monitor:
    """Connect to the QMP socket QEMU inherited; fail if QEMU exits first."""
    connect = asyncio.ensure_future(Monitor.connect(qmp_socket, name=name, timeout=timeout))
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not connect.done():
        connect.cancel()
        with contextlib.suppress(asyncio.CancelledError, VmferryError):
            await connect
        raise _StartFailure("")
    try:
        return connect.result()
    except VmferryError as err:
        if err.code == ErrorCode.OPERATION_TIMEOUT:
            raise _StartFailure(
                f"timed out after {timeout:g} s waiting for its QMP monitor"
            ) from err
        await proc.wait(1.0)  # the socket went away with QEMU: its log says why
        raise _StartFailure("" if not proc.alive else err.message) from err


def _exit_detail(proc: QemuProcess) -> str:
    code = proc.returncode
    if code is None:
        return "QEMU exited"
    if code < 0:
        return f"QEMU was killed by signal {-code}"
    return f"QEMU exited with status {code}"


def _log_tail(proc: QemuProcess) -> str:
    """The last lines QEMU wrote to its log in this run."""
    if proc.log_path is None:
        return ""
    try:
        with open(proc.log_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(proc.log_offset, size - _LOG_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-_LOG_TAIL_LINES:])


# Local, non-blocking file system calls (kept out of async functions' bodies).
def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    found = path.exists()
    trace.point("socket poll", "found" if found else "absent")
    return found
