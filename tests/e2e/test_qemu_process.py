"""QEMU process and QMP monitor (vmferry.qemu.process/monitor/launch), against real QEMU."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.launch import launch, reattach
from vmferry.qemu.monitor import Monitor
from vmferry.qemu.process import QemuProcess

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

Launched = tuple[QemuProcess, Monitor]


def qemu_argv(sock: Path, uuid: str, *, qmp: bool = True) -> list[str]:
    """A QEMU that sits paused (-S) with no kernel, QMP on *sock*."""
    argv = [
        "qemu-system-x86_64",
        "-name",
        "guest=test",
        "-uuid",
        uuid,
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-m",
        "64",
    ]
    if qmp:
        argv += [
            "-chardev",
            f"socket,id=mon,path={sock},server=on,wait=off",
            "-mon",
            "chardev=mon,mode=control",
        ]
    return argv


def live_pids_with(text: str) -> list[int]:
    """Pids of non-zombie processes whose command line contains *text*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry) != os.getpid():
            found.append(int(entry))
    return found


def kill_leftovers(uuid: str) -> None:
    for pid in live_pids_with(uuid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def uuid() -> Iterator[str]:
    value = str(uuidlib.uuid4())
    yield value
    kill_leftovers(value)  # whatever a failing test left behind


@pytest.fixture
async def start(tmp: Path, uuid: str) -> AsyncIterator[Callable[[], Awaitable[Launched]]]:
    """Launch QEMU (once per call); every one is killed and closed afterwards."""
    started: list[Launched] = []

    async def _start() -> Launched:
        sock = tmp / f"{len(started)}.qmp"
        result = await launch(
            qemu_argv(sock, uuid), qmp_socket=sock, log_path=tmp / "qemu.log", name="test"
        )
        started.append(result)
        return result

    yield _start
    for proc, mon in started:
        await mon.close()
        if proc.alive:
            await proc.kill()
        proc.close()


def process_gone(pid: int) -> bool:
    """True if *pid* no longer names a live process (gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def start_sleep_zero() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "0"])


def own_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


# ---------------------------------------------------------------- launch & QMP


async def test_launch_connects_and_executes(tmp: Path, uuid: str) -> None:
    sock = tmp / "m.qmp"
    t0 = time.monotonic()
    proc, mon = await launch(
        qemu_argv(sock, uuid), qmp_socket=sock, log_path=tmp / "q.log", name="test"
    )
    ready = time.monotonic() - t0
    try:
        print(f"\nspawn -> QMP ready: {ready * 1000:.1f} ms")
        assert ready < 10.0
        assert proc.alive and mon.connected
        assert await mon.execute("query-status") == {"status": "prelaunch", "running": False}
        # QEMU's command line really is the one we gave, in its own session
        assert proc.pid in live_pids_with(uuid)
        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
        header = (tmp / "q.log").read_text().splitlines()[0]
        assert header.endswith(": starting up vmferry: " + shlex.join(qemu_argv(sock, uuid)))
        assert proc.log_offset == len(header) + 1
    finally:
        await mon.close()
        await proc.kill()
        proc.close()
    assert not live_pids_with(uuid)


async def test_execute_errors(start: Callable[[], Awaitable[Launched]]) -> None:
    _proc, mon = await start()
    with pytest.raises(VmferryError) as info:
        await mon.execute("no-such-command")
    assert info.value.code == ErrorCode.QEMU_FAILED
    assert info.value.message.startswith("QEMU command 'no-such-command' failed: ")
    assert "no-such-command" in info.value.message.split("failed: ", 1)[1]

    with pytest.raises(VmferryError) as info:
        await mon.execute("query-status", timeout=1e-9)  # no round trip is that fast
    assert info.value.code == ErrorCode.OPERATION_TIMEOUT
    # the late reply is dropped and the monitor keeps working
    assert (await mon.execute("query-status"))["status"] == "prelaunch"
    assert await mon.execute("query-name") == {"name": "test"}

    await mon.close()
    assert not mon.connected
    with pytest.raises(VmferryError) as info:
        await mon.execute("query-status")
    assert info.value.code == ErrorCode.OPERATION_FAILED
    assert info.value.message == "QEMU monitor for domain 'test' is closed"


async def test_events_in_order(
    start: Callable[[], Awaitable[Launched]], caplog: pytest.LogCaptureFixture
) -> None:
    _proc, mon = await start()
    await mon.execute("cont")  # before any handler: kept for the first one
    seen: list[tuple[str, dict[str, object], float]] = []

    def broken(name: str, data: dict[str, object], stamp: float) -> None:
        raise RuntimeError("handler bug")

    mon.add_event_handler(broken)
    mon.add_event_handler(lambda *event: seen.append(event))
    with caplog.at_level(logging.ERROR, logger="vmferry.qemu.monitor"):
        await mon.execute("stop")
        await mon.execute("cont")
        await mon.execute("stop")
        # events precede the reply that follows them on the same socket
        await mon.execute("query-status")
    names = [name for name, _data, _stamp in seen]
    # RESUME of the first cont went to the first handler (broken) only
    assert names == ["STOP", "RESUME", "STOP"]
    assert all(abs(stamp - time.time()) < 60 for _n, _d, stamp in seen)
    assert seen[0][2] <= seen[1][2] <= seen[2][2]
    assert "handler bug" in caplog.text
    assert mon.connected  # a failing handler does not end the session


async def test_backlog_reaches_first_handler(start: Callable[[], Awaitable[Launched]]) -> None:
    _proc, mon = await start()
    await mon.execute("cont")
    await mon.execute("stop")
    seen: list[str] = []
    mon.add_event_handler(lambda name, data, stamp: seen.append(name))
    assert seen == ["RESUME", "STOP"]


# ------------------------------------------------------------ death and kill


async def test_external_sigkill_is_noticed(start: Callable[[], Awaitable[Launched]]) -> None:
    tasks_before = own_tasks()
    proc, mon = await start()
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    dropped = loop.create_future()
    proc.on_exit(lambda: exited.set_result(time.monotonic()))
    mon.on_disconnect(lambda: dropped.set_result(time.monotonic()))

    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    async with asyncio.timeout(1.0):
        t_exit, t_drop = await asyncio.gather(exited, dropped)
    assert t_exit - t0 < 1.0 and t_drop - t0 < 1.0
    print(
        f"\nnoticed SIGKILL: on_exit {1000 * (t_exit - t0):.1f} ms, "
        f"on_disconnect {1000 * (t_drop - t0):.1f} ms"
    )
    assert not proc.alive and not mon.connected
    assert proc.returncode == -signal.SIGKILL  # reaped: our child
    assert process_gone(proc.pid)
    with pytest.raises(VmferryError) as info:
        await mon.execute("query-status")
    assert info.value.code == ErrorCode.OPERATION_FAILED
    # the monitor's watcher and the QMP reader/writer tasks are all gone
    await asyncio.sleep(0)
    assert own_tasks() <= tasks_before
    # late registrations still hear about it, once
    late: list[str] = []
    proc.on_exit(lambda: late.append("exit"))
    mon.on_disconnect(lambda: late.append("drop"))
    await asyncio.sleep(0)
    assert sorted(late) == ["drop", "exit"]
    assert await proc.wait(0) is True
    await proc.kill()  # already gone: returns at once


async def test_kill_returns_only_when_gone(start: Callable[[], Awaitable[Launched]]) -> None:
    proc, mon = await start()
    dropped: list[bool] = []
    mon.on_disconnect(lambda: dropped.append(True))
    assert not await proc.wait(0.05)
    await proc.kill()
    assert not proc.alive
    assert proc.returncode == -signal.SIGKILL
    assert process_gone(proc.pid)
    await asyncio.sleep(0.05)
    assert dropped == [True]


async def test_kill_with_grace_uses_sigterm(
    start: Callable[[], Awaitable[Launched]], tmp: Path
) -> None:
    proc, _mon = await start()
    await proc.kill(grace=10.0)
    assert process_gone(proc.pid)
    assert proc.returncode == 0  # QEMU shut down by itself on SIGTERM
    assert "terminating on signal 15" in (tmp / "qemu.log").read_text()


async def test_close_leaves_no_task_and_no_callback(
    start: Callable[[], Awaitable[Launched]],
) -> None:
    tasks_before = own_tasks()
    proc, mon = await start()
    dropped: list[bool] = []
    mon.on_disconnect(lambda: dropped.append(True))
    assert own_tasks() - tasks_before  # QMP reader, writer, our watcher
    await mon.close()
    await mon.close()  # idempotent
    await asyncio.sleep(0)
    assert not (own_tasks() - tasks_before)
    assert dropped == []  # close() is not a drop
    assert proc.alive  # closing the monitor does not touch QEMU


# --------------------------------------------------------- attach / reattach

HELPER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from vmferry.qemu.launch import launch

    async def main():
        sock, log, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
        proc, mon = await launch(argv, qmp_socket=sock, log_path=log, name="test")
        await mon.execute("cont")
        print(proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the daemon dies, monitor still open

    asyncio.run(main())
""")


async def test_reattach_after_daemon_death(tmp: Path, uuid: str) -> None:
    sock = tmp / "m.qmp"
    helper = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HELPER,
        str(sock),
        str(tmp / "q.log"),
        *qemu_argv(sock, uuid),
        stdout=subprocess.PIPE,
    )
    out, _ = await helper.communicate()
    assert helper.returncode == -signal.SIGKILL
    pid = int(out)
    assert not process_gone(pid)  # QEMU outlived its parent

    assert QemuProcess.attach(pid, expect_in_cmdline=str(uuidlib.uuid4())) is None
    result = await reattach(pid, uuid=uuid, qmp_socket=sock, name="test")
    assert result is not None
    proc, mon = result
    try:
        assert proc.pid == pid and proc.alive
        assert (await mon.execute("query-status"))["status"] == "running"
        # and once more, as after a second restart
        await mon.close()
        mon = await Monitor.connect(sock, name="test")
        await mon.execute("stop")
        assert (await mon.execute("query-status"))["status"] == "paused"

        dropped = asyncio.get_running_loop().create_future()
        mon.on_disconnect(lambda: dropped.set_result(True))
        # Not our child any more: kill() must not depend on anyone reaping it.
        await proc.kill()
        assert process_gone(pid)
        assert proc.returncode is None
        async with asyncio.timeout(1.0):
            await dropped
    finally:
        await mon.close()
        proc.close()
    # gone (or a zombie waiting for PID 1): reattach says so
    assert await reattach(pid, uuid=uuid, qmp_socket=sock, name="test") is None


async def test_attach_refuses_wrong_or_dead_process(
    start: Callable[[], Awaitable[Launched]], uuid: str
) -> None:
    proc, _mon = await start()
    assert QemuProcess.attach(proc.pid, expect_in_cmdline=str(uuidlib.uuid4())) is None
    assert QemuProcess.attach(os.getpid(), expect_in_cmdline=uuid) is None
    again = QemuProcess.attach(proc.pid, expect_in_cmdline=uuid)
    assert again is not None and again.alive
    again.close()
    assert proc.alive  # closing a second handle does not affect QEMU

    # A zombie (exited, not reaped yet) carrying the text is refused, too.
    zombie = start_sleep_zero()
    fd = os.pidfd_open(zombie.pid)
    try:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        async with asyncio.timeout(5):
            await ready
        loop.remove_reader(fd)
        assert QemuProcess.attach(zombie.pid, expect_in_cmdline="sleep") is None
    finally:
        os.close(fd)
        zombie.wait()

    await proc.kill()
    assert QemuProcess.attach(proc.pid, expect_in_cmdline=uuid) is None
    assert QemuProcess.attach(2**22 + 12345, expect_in_cmdline=uuid) is None


# ------------------------------------------------------------- launch failure


async def test_launch_failure_reports_qemu_message(tmp: Path, uuid: str) -> None:
    sock = tmp / "m.qmp"
    with pytest.raises(VmferryError) as info:
        await launch(
            [*qemu_argv(sock, uuid), "-no-such-option"],
            qmp_socket=sock,
            log_path=tmp / "q.log",
            name="bad",
        )
    assert info.value.code == ErrorCode.QEMU_FAILED
    assert info.value.message.startswith("QEMU for domain 'bad' failed to start: ")
    assert "-no-such-option: invalid option" in info.value.message
    assert "starting up" not in info.value.message  # our header is not QEMU's message
    assert not live_pids_with(uuid)

    with pytest.raises(VmferryError) as info:
        await launch(
            ["/nonexistent/qemu", "-S"], qmp_socket=sock, log_path=tmp / "q.log", name="bad"
        )
    assert info.value.code == ErrorCode.QEMU_FAILED
    assert "/nonexistent/qemu" in info.value.message


async def test_launch_timeout_kills_qemu(tmp: Path, uuid: str) -> None:
    sock = tmp / "m.qmp"
    t0 = time.monotonic()
    with pytest.raises(VmferryError) as info:
        await launch(
            qemu_argv(sock, uuid, qmp=False),
            qmp_socket=sock,
            log_path=tmp / "q.log",
            name="slow",
            timeout=0.5,
        )
    assert 0.5 <= time.monotonic() - t0 < 5
    assert info.value.code == ErrorCode.QEMU_FAILED
    assert "failed to start: timed out after 0.5 s" in info.value.message
    assert not live_pids_with(uuid)
