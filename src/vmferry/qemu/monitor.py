"""
QMP Monitor

`Monitor` is the daemon's connection to one QEMU's QMP socket: a thin
layer over `qemu.qmp.QMPClient` that speaks vmferry's errors, hands
every QMP event to plain callbacks, and reports a dropped connection
(QEMU died or quit) exactly once.

Events are delivered synchronously from the QMP client's own reader
task, in the order QEMU sent them; no extra task and no unbounded
queue is involved. The only task of our own is a small watcher that
notices the end of the connection; it ends with the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from vmferry import logs, trace
from vmferry.errors import ErrorCode, VmferryError

logger = logging.getLogger(__name__)

#: (event name, event data, timestamp in seconds since the epoch)
EventHandler = Callable[[str, dict[str, Any], float], None]
#: A QMP command and its arguments, for `Monitor.execute_all`.
QmpCommand = tuple[str, Mapping[str, object] | None]

# Events heard before the first handler is added wait here (bounded: a
# monitor nobody listens to must not grow without limit).
_BACKLOG_MAX = 1000


class _CallbackListener(EventListener):
    """
    An `EventListener` that calls its owner instead of queueing.

    ``QMPClient`` awaits `put()` from its reader task for every event, so
    this delivers events in order without a queue, a history, or a task.
    """

    def __init__(self, deliver: Callable[[Message], None]) -> None:
        super().__init__()
        self._deliver = deliver

    async def put(self, event: Message) -> None:
        self._deliver(event)


#: Sent out of band: QEMU runs them on the monitor's own thread. They are the way out of a
#: post-copy stall, where QEMU's main loop waits for a page that cannot arrive.
OUT_OF_BAND = frozenset({"migrate-pause", "migrate-recover", "yank"})


class Monitor:
    """
    A QMP connection to one QEMU.

    Obtain instances with `connect()`.

    :param client: A connected `QMPClient`.
    :param name: The domain's name, used in messages.
    """

    def __init__(self, client: QMPClient, name: str) -> None:
        self._client = client
        self.name = name
        self._handlers: list[EventHandler] = []
        self._backlog: deque[tuple[str, dict[str, Any], float]] | None = deque(maxlen=_BACKLOG_MAX)
        self._disconnect_cbs: list[Callable[[], None]] = []
        self._dropped = False  # the connection ended without close()
        self._closing = False
        self._dc_lock = asyncio.Lock()
        self._fd_lock = asyncio.Lock()  # one descriptor in flight: the next add-fd/getfd takes it
        self._watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Monitor {self.name!r} {self._client.runstate.name}>"

    # ------------------------------------------------------------ connection

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        *,
        name: str = "",
        timeout: float = 10.0,
    ) -> Monitor:
        """
        Connect to QEMU's QMP socket and negotiate capabilities.

        :param socket_path: The QMP UNIX socket.
        :param name: The domain's name, used in messages and logs.
        :param timeout: Seconds for connecting, greeting and negotiation.
        :raise VmferryError: ``OPERATION_TIMEOUT`` when QEMU does not answer
            in time (e.g. another client holds its monitor);
            ``OPERATION_FAILED`` when the connection fails.
        """
        # The monitor's tasks outlive the migration that may start this QEMU: not its log lines.
        with logs.detached():
            return await cls._connect(socket_path, name=name, timeout=timeout)

    @classmethod
    async def _connect(cls, socket_path: Path, *, name: str, timeout: float) -> Monitor:
        client = QMPClient(name or None)
        # The built-in all-events listener would keep every event forever.
        client.events.event_filter = lambda _event: False
        monitor = cls(client, name)
        client.register_listener(_CallbackListener(monitor._on_event))
        try:
            async with asyncio.timeout(timeout):
                await client.connect(str(socket_path))
        except TimeoutError:
            # connect() rolls itself back to IDLE when cancelled.
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"timed out after {timeout:g} s connecting to the QEMU monitor "
                f"of domain '{name}' at {socket_path}",
            ) from None
        except ConnectError as err:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot connect to the QEMU monitor of domain '{name}' at "
                f"{socket_path}: {_describe(err.exc)}",
            ) from err
        monitor._watcher = asyncio.create_task(monitor._watch(), name=f"qmp-watch-{name}")
        return monitor

    @property
    def connected(self) -> bool:
        """True while commands can be sent."""
        return not self._closing and self._client.runstate == Runstate.RUNNING

    def on_disconnect(self, cb: Callable[[], None]) -> None:
        """
        Call *cb* once when the connection drops (QEMU died, quit, or closed it).

        Not called for a connection ended by `close()`. If the connection
        has already dropped, *cb* is called soon. Exceptions are logged.
        """
        if self._dropped:
            asyncio.get_running_loop().call_soon(self._run_callback, cb)
        elif not self._closing:
            self._disconnect_cbs.append(cb)

    async def close(self) -> None:
        """Disconnect; no task of this monitor survives this. Idempotent."""
        with trace.span("qmp close"):
            self._closing = True
            self._disconnect_cbs.clear()
            self._backlog = None
            await self._disconnect_client()
            watcher, self._watcher = self._watcher, None
            if watcher is not None and watcher is not asyncio.current_task():
                await watcher

    # -------------------------------------------------------------- commands

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Any:
        """
        Execute a QMP command and return its ``return`` value.

        :raise VmferryError: ``QEMU_FAILED`` when QEMU answers with an error;
            ``OPERATION_TIMEOUT`` when it does not answer within *timeout*
            seconds; ``OPERATION_FAILED`` when the monitor is closed or the
            connection drops before the answer.
        """
        if not self.connected:
            raise self._closed_error()
        try:
            with trace.span("qmp", cmd):
                async with asyncio.timeout(timeout):
                    if cmd in OUT_OF_BAND:
                        msg = self._client.make_execute_msg(cmd, args, oob=True)
                        return await self._client.execute_msg(msg)
                    reply = await self._client.execute(cmd, args)
            if cmd == "query-migrate" and isinstance(reply, dict) and "downtime" in reply:
                # QEMU's own figure; vmferry's statistics show the host-clock one
                trace.point("qemu downtime", seconds=reply["downtime"] / 1000)
            return reply
        except ExecuteError as err:
            raise VmferryError(
                ErrorCode.QEMU_FAILED, f"QEMU command '{cmd}' failed: {err.error.error.desc}"
            ) from err
        except TimeoutError:
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"timed out after {timeout:g} s waiting for QEMU command '{cmd}' "
                f"on domain '{self.name}'",
            ) from None
        except (ExecInterruptedError, StateError) as err:
            raise self._closed_error() from err
        except QMPError as err:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"QEMU command '{cmd}' on domain '{self.name}' failed: {err}",
            ) from err

    async def execute_all(
        self, commands: Sequence[QmpCommand], *, timeout: float = 30.0
    ) -> list[Any]:
        """
        Execute *commands* pipelined (see `execute_each`): one round trip for all.

        QEMU runs a monitor's (in-band) commands one after another in the order
        they came, so the effect is that of executing them in turn, except that a
        failure does not stop the commands after it: use it where the caller
        undoes the whole batch on failure (e.g. kills the QEMU it just started).

        :return: The ``return`` values, in order.
        :raise VmferryError: The first failing command's error (see `execute`),
            once every command has been answered.
        """
        replies = await self.execute_each(commands, timeout=timeout)
        for reply in replies:
            if isinstance(reply, VmferryError):
                raise reply
        return replies

    async def execute_each(
        self, commands: Sequence[QmpCommand], *, timeout: float = 30.0
    ) -> list[Any]:
        """
        Send *commands* at once, then await every answer: the ``return`` value of
        each, or the `VmferryError` it failed with (see `execute`), in order.
        """
        if len(commands) == 1:
            cmd, args = commands[0]
            try:
                return [await self.execute(cmd, args, timeout=timeout)]
            except VmferryError as err:
                return [err]
        # Tasks start in creation order and each queues its message before its first
        # suspension, so the messages go out in this order.
        tasks = [
            asyncio.ensure_future(self.execute(cmd, args, timeout=timeout))
            for cmd, args in commands
        ]
        try:
            with trace.span("qmp batch", lambda: "+".join(c for c, _ in commands)):
                replies = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, VmferryError):
                raise reply
        return replies

    async def execute_with_fd(
        self, cmd: str, args: Mapping[str, object], fd: int, *, timeout: float = 30.0
    ) -> Any:
        """*cmd* (``getfd`` or ``add-fd``) taking *fd*, passed with SCM_RIGHTS just before it.

        The caller keeps (and closes) its own copy of *fd*.
        """
        if not self.connected:
            raise self._closed_error()
        async with self._fd_lock:
            try:
                self._client.send_fd_scm(fd)
            except (QMPError, OSError) as err:
                raise VmferryError(
                    ErrorCode.OPERATION_FAILED,
                    f"cannot pass a file descriptor to QEMU of domain '{self.name}': {err}",
                ) from err
            return await self.execute(cmd, args, timeout=timeout)

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of descriptor *fd*, kept under *name* (QMP ``getfd``; replaces one
        of that name). The caller keeps and closes its own *fd*."""
        await self.execute_with_fd("getfd", {"fdname": name}, fd)

    def _closed_error(self) -> VmferryError:
        return VmferryError(
            ErrorCode.OPERATION_FAILED, f"QEMU monitor for domain '{self.name}' is closed"
        )

    # ---------------------------------------------------------------- events

    def add_event_handler(self, handler: EventHandler) -> None:
        """
        Call *handler(name, data, timestamp)* for every QMP event, in order.

        Handlers run synchronously in the QMP reader task and must not
        block; exceptions they raise are logged. Events that arrived before
        the first handler was added are delivered to it right here, so none
        is lost between `connect()` and the caller's setup.
        """
        self._handlers.append(handler)
        backlog, self._backlog = self._backlog, None
        for event in backlog or ():
            self._dispatch(*event)

    def _on_event(self, msg: Message) -> None:
        name = str(msg.get("event", ""))
        data = msg.get("data")
        stamp = msg.get("timestamp")
        seconds = 0.0
        if isinstance(stamp, Mapping):
            seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        event = (name, dict(data) if isinstance(data, Mapping) else {}, seconds)
        if self._backlog is not None:
            self._backlog.append(event)
        else:
            self._dispatch(*event)

    def _dispatch(self, name: str, data: dict[str, Any], stamp: float) -> None:
        for handler in list(self._handlers):
            try:
                handler(name, data, stamp)
            except Exception:
                logger.exception("QMP event handler failed on %s for domain '%s'", name, self.name)

    # ------------------------------------------------------------- internals

    async def _watch(self) -> None:
        """Wait for the session to end; if it was not close(), report the drop."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        if self._closing:
            return
        await self._disconnect_client()
        self._dropped = True
        logger.debug("QEMU monitor for domain '%s' disconnected", self.name)
        callbacks, self._disconnect_cbs = self._disconnect_cbs, []
        for cb in callbacks:
            self._run_callback(cb)

    async def _disconnect_client(self) -> None:
        # QMPClient.disconnect() must not run twice concurrently.
        async with self._dc_lock:
            if self._client.runstate == Runstate.IDLE:
                return
            try:
                await self._client.disconnect()
            except Exception as err:  # EOFError etc.: why the session ended
                logger.debug("QEMU monitor for domain '%s' ended: %r", self.name, err)

    def _run_callback(self, cb: Callable[[], None]) -> None:
        try:
            cb()
        except Exception:
            logger.exception("disconnect callback for domain '%s' failed", self.name)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "QEMU closed the connection"
    return str(exc) or type(exc).__name__
