"""
QEMU Processes

A `QemuProcess` is one QEMU the daemon started, or re-found after a
restart. It is watched through a pidfd, never through its pid alone:
pids are reused, and an exited QEMU may linger as a zombie for a while
(PID 1 on these hosts reaps orphans slowly), so ``kill(pid, 0)`` and
``/proc/<pid>`` lie about whether QEMU is still there. A pidfd becomes
readable the moment the process exits, reaped or not.

QEMU runs in its own session, so signals aimed at the daemon's process
group (Ctrl-C, a service manager's stop) do not reach it: QEMU must
outlive a daemon that is killed and restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from vmferry import trace
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.confine import QemuUser

logger = logging.getLogger(__name__)

# How long a SIGKILLed QEMU may take to go away before kill() gives up.
# Only a process stuck in uninterruptible sleep (e.g. on dead storage) takes long.
KILL_TIMEOUT = 30.0


class QemuProcess:
    """
    One QEMU process, watched through a pidfd.

    Obtain instances from `spawn()` (a new QEMU, our child) or `attach()`
    (a QEMU found again after a daemon restart, no longer our child).

    :param pid: The process id.
    :param pidfd: An open pidfd for *pid*; the instance owns it.
    :param child: Whether the process is our child, so we must reap it.
    :param log_path: Where QEMU's stdout/stderr go, if known.
    :param log_offset: Where QEMU's own output starts in *log_path*.
    """

    def __init__(
        self,
        pid: int,
        pidfd: int,
        *,
        child: bool,
        log_path: Path | None = None,
        log_offset: int = 0,
    ) -> None:
        #: The process id.
        self.pid = pid
        #: QEMU's log file (stdout and stderr), when we started it.
        self.log_path = log_path
        #: Offset in `log_path` where QEMU's own output begins.
        self.log_offset = log_offset
        #: Exit status once reaped: the exit code, or ``-signal`` (like
        #: `subprocess.Popen.returncode`). Stays None for processes that are
        #: not our child, whose status only their real parent can learn.
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd
        self._child = child
        self._exited = False
        self._exit_event = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Kept so that subprocess never reaps the child behind the pidfd's back.
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "exited" if self._exited else "closed" if self._pidfd is None else "running"
        return f"<QemuProcess pid={self.pid} {state}>"

    # ---------------------------------------------------------------- creation

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        user: QemuUser | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> QemuProcess:
        """
        Start QEMU in a new session, with its output appended to *log_path*.

        A header line (time and command line, as libvirt writes into its
        per-domain log) goes first, so the log tells which run said what.

        :param argv: The complete command line; ``argv[0]`` is looked up in PATH.
        :param log_path: QEMU's log; created if missing, always appended to.
        :param env: QEMU's environment; the daemon's own when None.
        :param user: run QEMU as this user (its group, no supplementary groups).
        :param pass_fds: descriptors QEMU inherits under the same numbers.
        :raise VmferryError: ``QEMU_FAILED`` when the program cannot be executed.
        """
        popen, log_offset = _spawn(argv, log_path, env, user, pass_fds)
        # Our child cannot be reaped by anyone but us, so its pid is still ours here.
        pidfd = os.pidfd_open(popen.pid)
        proc = cls(popen.pid, pidfd, child=True, log_path=log_path, log_offset=log_offset)
        proc._popen = popen
        proc._watch()
        logger.debug("spawned QEMU pid %d: %s", popen.pid, shlex.join(argv))
        return proc

    @classmethod
    def attach(cls, pid: int, *, expect_in_cmdline: str) -> QemuProcess | None:
        """
        Find a running QEMU again by pid, e.g. after a daemon restart.

        The pid must name a live (non-zombie) process whose command line
        contains *expect_in_cmdline* (the domain's UUID), which guards
        against the pid having been reused by another process.

        :return: The process, or None if it is gone or is not the expected one.
        """
        if not expect_in_cmdline:
            raise ValueError("expect_in_cmdline must not be empty")
        try:
            pidfd = os.pidfd_open(pid)
        except (OSError, OverflowError):  # ESRCH mostly; EINVAL for absurd pids
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = ""
        # Checked after reading: while the pidfd is not readable, the process
        # has not exited, so the pid cannot have been reused under us.
        if expect_in_cmdline not in cmdline or _pidfd_readable(pidfd):
            os.close(pidfd)
            return None
        proc = cls(pid, pidfd, child=False)
        try:
            proc._watch()
        except RuntimeError:
            pass  # no running loop: watching starts with on_exit()/wait()
        return proc

    # ----------------------------------------------------------------- queries

    @property
    def alive(self) -> bool:
        """
        Whether the process has not exited yet (a zombie counts as exited).

        False as well once `close()` was called.
        """
        if self._exited or self._pidfd is None:
            return False
        return not _pidfd_readable(self._pidfd)

    def on_exit(self, cb: Callable[[], None]) -> None:
        """
        Call *cb* once, from the event loop, when the process exits.

        If it has already exited, *cb* is called soon. Exceptions raised by
        *cb* are logged.
        """
        if self._exited:
            asyncio.get_running_loop().call_soon(self._run_callback, cb)
            return
        self._callbacks.append(cb)
        self._watch()

    async def wait(self, timeout: float | None = None) -> bool:
        """
        Wait for the process to exit.

        :param timeout: Seconds to wait at most; None waits forever.
        :return: True once the process has exited, False on timeout.
        """
        if self._exited:
            return True
        if self._pidfd is None:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR, f"QEMU process {self.pid} is no longer watched"
            )
        self._watch()
        try:
            async with asyncio.timeout(timeout):
                await self._exit_event.wait()
        except TimeoutError:
            pass
        return self._exited

    # ----------------------------------------------------------------- actions

    def send_signal(self, sig: int) -> bool:
        """Send *sig* through the pidfd; False if the process is already gone."""
        if self._exited or self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    async def kill(self, *, grace: float = 0.0) -> None:
        """
        Make the process go away, returning only once it has exited.

        With *grace* > 0, send SIGTERM first and give QEMU that many seconds
        to shut down by itself; then (or right away) SIGKILL.

        :raise VmferryError: ``OPERATION_FAILED`` if even SIGKILL does not
            end it within `KILL_TIMEOUT` seconds.
        """
        with trace.span("qemu kill"):
            await self._kill(grace)

    async def _kill(self, grace: float) -> None:
        if grace > 0 and self.send_signal(signal.SIGTERM) and await self.wait(grace):
            return
        self.send_signal(signal.SIGKILL)
        if not await self.wait(KILL_TIMEOUT):
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"QEMU process {self.pid} did not exit {KILL_TIMEOUT:g} s after SIGKILL",
            )

    def close(self) -> None:
        """
        Stop watching the process and close the pidfd; QEMU keeps running.

        Pending `on_exit` callbacks are dropped and the object is inert
        afterwards. Idempotent.
        """
        self._unwatch()
        self._callbacks.clear()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    # ----------------------------------------------------------------- internals

    def _watch(self) -> None:
        """Make the event loop tell us when the pidfd becomes readable."""
        if self._loop is not None or self._exited or self._pidfd is None:
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(self._pidfd, self._handle_exit)
        self._loop = loop

    def _unwatch(self) -> None:
        if self._loop is not None and self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        self._loop = None

    def _handle_exit(self) -> None:
        """The pidfd fired: reap (our child only) and notify everyone once."""
        self._unwatch()
        if self._exited:
            return
        self._exited = True
        if self._child:
            self._reap()
        logger.debug("QEMU pid %d exited (status %s)", self.pid, self.returncode)
        self._exit_event.set()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self._run_callback(cb)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped elsewhere; nothing to learn
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            if self._popen is not None:
                self._popen.returncode = self.returncode  # reaped: subprocess must not wait

    def _run_callback(self, cb: Callable[[], None]) -> None:
        try:
            cb()
        except Exception:
            logger.exception("exit callback for QEMU pid %d failed", self.pid)


def _pidfd_readable(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _spawn(
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None,
    user: QemuUser | None,
    pass_fds: tuple[int, ...],
) -> tuple[subprocess.Popen[bytes], int]:
    """Start *argv* (see `QemuProcess.spawn`); return the child and the log offset.

    subprocess rather than posix_spawn: only a fork can drop to QEMU's user
    (setgroups, setgid, setuid) before exec, as libvirt does.
    """
    if not argv:
        raise VmferryError(ErrorCode.INTERNAL_ERROR, "empty QEMU command line")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S%z")
    who = f" as {user.name} ({user.uid}:{user.gid})" if user is not None else ""
    header = f"{stamp}: starting up vmferry{who}: {shlex.join(argv)}\n".encode()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(log_fd, header)
        log_offset = os.fstat(log_fd).st_size
        drop: dict[str, object] = {}
        if user is not None:
            drop = {"user": user.uid, "group": user.gid, "extra_groups": []}
        try:
            popen = subprocess.Popen(  # type: ignore[call-overload]
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env=dict(os.environ) if env is None else env,
                pass_fds=pass_fds,
                start_new_session=True,
                # Python ignores SIGPIPE/SIGXFSZ; an ignored signal survives exec.
                restore_signals=True,
                **drop,
            )
        except OSError as err:
            msg = f"cannot execute QEMU binary '{argv[0]}': {err.strerror}"
            os.write(log_fd, f"{msg}\n".encode())
            raise VmferryError(ErrorCode.QEMU_FAILED, msg) from err
    finally:
        os.close(log_fd)
    assert isinstance(popen, subprocess.Popen)
    return popen, log_offset
