"""
A stand-in for :class:`vmferry.qemu.monitor.Monitor` in pure-logic unit tests.

It records every command, answers from a script, and delivers the events a
test emits, so code that talks to QEMU (parameters, policies, recovery
decisions) runs in milliseconds without a QEMU::

    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    mon.fail("calc-dirty-rate", "not supported")
    await params.apply(mon.as_monitor(), MigrationParams(), flags, source=True)
    assert mon.commands() == ["migrate-set-capabilities", "migrate-set-parameters"]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.monitor import EventHandler, Monitor, QmpCommand

#: A scripted answer: a value, a VmferryError to raise, or a function of the arguments.
Reply = Any


class FakeMonitor:
    """Records commands; answers each from its queue, else its standing reply, else ``{}``."""

    def __init__(self, name: str = "fake", replies: Mapping[str, Reply] | None = None) -> None:
        self.name = name
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.connected = True
        self._standing: dict[str, Reply] = dict(replies or {})
        self._queued: dict[str, deque[Reply]] = {}
        self._handlers: list[EventHandler] = []
        self._disconnect_cbs: list[Callable[[], None]] = []

    def as_monitor(self) -> Monitor:
        """This fake, typed as the real thing for the code under test."""
        return cast(Monitor, self)

    # -- the script ---------------------------------------------------------------------------

    def reply(self, cmd: str, *answers: Reply) -> None:
        """Answer the next calls of *cmd* with *answers*, in order (then the standing reply)."""
        self._queued.setdefault(cmd, deque()).extend(answers)

    def always(self, cmd: str, answer: Reply) -> None:
        """Answer every call of *cmd* with *answer* once the queued ones are used."""
        self._standing[cmd] = answer

    def fail(
        self, cmd: str, message: str = "failed", code: ErrorCode = ErrorCode.QEMU_FAILED
    ) -> None:
        """Make every call of *cmd* raise, as QEMU's error answer does through the real Monitor."""
        self._standing[cmd] = VmferryError(code, f"QEMU command '{cmd}' failed: {message}")

    # -- what the code under test sees --------------------------------------------------------

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Record the call; answer from the script."""
        if not self.connected:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED, f"QEMU monitor for domain '{self.name}' is closed"
            )
        call_args = dict(args or {})
        self.calls.append((cmd, call_args))
        queue = self._queued.get(cmd)
        answer = queue.popleft() if queue else self._standing.get(cmd, {})
        if isinstance(answer, VmferryError):
            raise answer
        if callable(answer):
            return answer(call_args)
        return answer

    async def execute_each(
        self, commands: Sequence[QmpCommand], *, timeout: float = 30.0
    ) -> list[Any]:
        """Each command in turn (as the real monitor's pipelined batch): answers or errors."""
        out: list[Any] = []
        for cmd, args in commands:
            try:
                out.append(await self.execute(cmd, args, timeout=timeout))
            except VmferryError as err:
                out.append(err)
        return out

    async def execute_all(
        self, commands: Sequence[QmpCommand], *, timeout: float = 30.0
    ) -> list[Any]:
        """Every command runs; the first error is raised after the last (as the real one)."""
        out = await self.execute_each(commands, timeout=timeout)
        for answer in out:
            if isinstance(answer, VmferryError):
                raise answer
        return out

    def add_event_handler(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def on_disconnect(self, cb: Callable[[], None]) -> None:
        self._disconnect_cbs.append(cb)

    async def close(self) -> None:
        self.connected = False
        self._disconnect_cbs.clear()

    # -- what the test does -------------------------------------------------------------------

    def emit(self, event: str, data: Mapping[str, Any] | None = None, stamp: float = 0.0) -> None:
        """Deliver a QMP event to every handler, as the real monitor's reader does."""
        for handler in list(self._handlers):
            handler(event, dict(data or {}), stamp)

    def drop(self) -> None:
        """The connection ends (QEMU died): later commands fail, disconnect callbacks run."""
        self.connected = False
        cbs, self._disconnect_cbs = self._disconnect_cbs, []
        for cb in cbs:
            cb()

    def commands(self) -> list[str]:
        """The names of the commands sent, in order."""
        return [cmd for cmd, _ in self.calls]

    def args_of(self, cmd: str) -> list[dict[str, Any]]:
        """The arguments of every call of *cmd*, in order."""
        return [args for name, args in self.calls if name == cmd]
