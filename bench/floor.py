"""
The performance floor: a live migration with nothing but two QEMUs and QMP.

No daemon, no job model, no cookie: start a source QEMU and a destination
QEMU (``-incoming defer -S``), point one at the other over TCP and wait.
Whatever vmferry adds on top of :func:`bare_migrate` is overhead to measure
against this.

Usage::

    async with BareQemu(argv_src, qmp_src) as src, BareQemu(argv_dst, qmp_dst) as dst:
        result = await bare_migrate(src.qmp, dst.qmp)

The storage floor (:func:`bare_storage_hop`) is libvirt's NBD scheme with
nothing around it: create the destination's disk, serve it over NBD from the
destination QEMU, ``blockdev-mirror`` into it, migrate memory, end the mirror
at the switchover (``pause-before-switchover``), resume the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

from qemu.qmp import EventListener, QMPClient

from vmferry.errors import ErrorCode, VmferryError

__all__ = [
    "FLOOR_CAPABILITIES",
    "FLOOR_PARAMETERS",
    "BareDisk",
    "BareHop",
    "BareMigration",
    "BareQemu",
    "BareStorageHop",
    "bare_hop",
    "bare_migrate",
    "bare_storage_hop",
    "disk_argv",
    "free_port",
    "guest_argv",
]

_TERMINAL = frozenset({"completed", "failed", "cancelled"})

#: What vmferry sets for a plain live migration (``vmferry.migration.params``
#: plus the ``events`` capability every vmferry QEMU gets at start).
FLOOR_CAPABILITIES: Mapping[str, bool] = {"events": True, "return-path": True}
#: "Unlimited" bandwidth, as vmferry asks for: QEMU's default would cap at 128 MiB/s.
FLOOR_PARAMETERS: Mapping[str, object] = {"max-bandwidth": 1 << 40}


def guest_argv(
    kernel: Path,
    initrd: Path,
    cmdline: str,
    *,
    qmp: Path,
    console: Path,
    memory_mib: int = 128,
    incoming: bool = False,
    binary: str = "qemu-system-x86_64",
    extra: Sequence[str] = (),
) -> list[str]:
    """
    A minimal QEMU command line for the test guest.

    :param qmp: Unix socket QEMU listens on for QMP.
    :param console: File the serial console is written to.
    :param incoming: Start as a migration destination: ``-incoming defer``
        and ``-S`` so the guest only runs after an explicit ``cont``.
    :param extra: More arguments (e.g. :func:`disk_argv`).
    """
    argv = [
        binary,
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        f"{memory_mib}M",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-chardev",
        f"file,id=con0,path={console}",
        "-serial",
        "chardev:con0",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    argv += list(extra)
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv


def _open_log(path: Path | None) -> BinaryIO:
    return open(path if path else os.devnull, "ab")


class BareQemu:
    """
    One QEMU process and a QMP connection to it, as an async context manager.

    The process is killed on exit, whatever happened inside the block.

    :param argv: QEMU command line; must open QMP on the unix socket *qmp*.
    :param qmp: Path of that socket.
    :param log: Where QEMU's stdout/stderr go (default: discarded).
    :param timeout: Seconds to wait for the QMP socket.
    :param poll_s: How often to look for the QMP socket while QEMU starts.
        Kept short: the benchmark times starts, and a coarse poll would be
        charged to the floor.
    """

    def __init__(
        self,
        argv: Sequence[str],
        qmp: Path,
        *,
        log: Path | None = None,
        timeout: float = 10.0,
        poll_s: float = 0.005,
    ) -> None:
        self.argv = list(argv)
        self.qmp_path = qmp
        self.log = log
        self.timeout = timeout
        self.poll_s = poll_s
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(qmp.name)

    async def start(self) -> None:
        """Spawn QEMU and connect to its QMP socket."""
        out = _open_log(self.log)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        finally:
            out.close()
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.returncode is not None:
                raise VmferryError(
                    ErrorCode.QEMU_FAILED,
                    f"QEMU exited with status {self.proc.returncode} before QMP was up"
                    + (f"; see {self.log}" if self.log else ""),
                )
            try:
                await self.qmp.connect(str(self.qmp_path))
                return
            except Exception as exc:  # ConnectError; the socket may not exist yet
                if time.monotonic() > deadline:
                    raise VmferryError(
                        ErrorCode.OPERATION_TIMEOUT,
                        f"no QMP on {self.qmp_path} after {self.timeout:g}s: {exc}",
                    ) from exc
                await asyncio.sleep(self.poll_s)

    async def stop(self) -> None:
        """Kill QEMU (no graceful shutdown: the guest holds nothing worth saving)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.disconnect(), 2)
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        return await self.qmp.execute(cmd, args)

    async def __aenter__(self) -> BareQemu:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass(frozen=True)
class BareMigration:
    """What one :func:`bare_migrate` took."""

    #: ``migrate`` issued -> destination running again (after ``cont``), host clock.
    total_s: float
    #: ``migrate`` issued -> source reports ``completed``, host clock (poll granularity).
    migrate_s: float
    #: QEMU's own figures from the source's final ``query-migrate``.
    qemu_total_ms: int | None
    downtime_ms: int | None
    ram_transferred: int | None
    #: The URI the destination listened on.
    uri: str
    #: Final ``query-migrate`` of the source, as QEMU returned it.
    info: dict[str, Any] = field(repr=False)


async def _wait_status(
    qmp: QMPClient, cmd: str, done: frozenset[str], deadline: float, poll_s: float
) -> dict[str, Any]:
    while True:
        info = cast(dict[str, Any], await qmp.execute(cmd))
        if info.get("status") in done:
            return info
        if time.monotonic() > deadline:
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"{cmd} still reports {info.get('status')!r}; gave up waiting",
            )
        await asyncio.sleep(poll_s)


async def bare_migrate(
    src: QMPClient,
    dst: QMPClient,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    capabilities: Mapping[str, bool] | None = None,
    parameters: Mapping[str, object] | None = None,
    limit_s: float = 60.0,
    poll_s: float = 0.02,
) -> BareMigration:
    """
    Live-migrate a running source QEMU into a waiting destination over TCP.

    The destination must have been started with ``-incoming defer -S``. Its
    listening port is chosen by QEMU when *port* is 0 (read back from its
    ``query-migrate``), so concurrent runs never race for a port.

    :param src: QMP of the running source.
    :param dst: QMP of the destination.
    :param capabilities: Migration capabilities, set on both sides.
    :param parameters: Migration parameters (e.g. ``max-bandwidth``), set on the source.
    :param limit_s: Seconds for the whole migration; the source job is
        cancelled when they run out.
    :return: Timings; the source is left in ``postmigrate``, the destination running.
    :raise VmferryError: ``OPERATION_FAILED`` if QEMU reports the migration
        failed, ``OPERATION_TIMEOUT`` if it does not finish in time.
    """
    deadline = time.monotonic() + limit_s
    if capabilities:
        caps = [{"capability": k, "state": v} for k, v in capabilities.items()]
        for side in (src, dst):
            await side.execute("migrate-set-capabilities", {"capabilities": caps})
    if parameters:
        await src.execute("migrate-set-parameters", dict(parameters))

    await dst.execute("migrate-incoming", {"uri": f"tcp:{host}:{port}"})
    if port == 0:
        incoming = cast(dict[str, Any], await dst.execute("query-migrate"))
        addrs = incoming.get("socket-address") or []
        ports = [a["port"] for a in addrs if a.get("type") in ("inet", "ipv4", "ipv6")]
        if not ports:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED, f"destination reports no listening port: {incoming}"
            )
        port = int(ports[0])
    uri = f"tcp:{host}:{port}"

    t0 = time.monotonic()
    await src.execute("migrate", {"uri": uri})
    try:
        info = await _wait_status(src, "query-migrate", _TERMINAL, deadline, poll_s)
    except BaseException:
        with contextlib.suppress(Exception):
            await src.execute("migrate_cancel")
        raise
    t_done = time.monotonic()
    if info["status"] != "completed":
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"migration {info['status']}: {info.get('error-desc', 'no reason given')}",
        )
    # The destination finishes loading a moment after the source is done sending.
    await _wait_status(dst, "query-migrate", frozenset({"completed"}), deadline, poll_s)
    await _wait_status(dst, "query-status", frozenset({"paused"}), deadline, poll_s)
    await dst.execute("cont")
    t_running = time.monotonic()

    ram = info.get("ram") or {}
    return BareMigration(
        total_s=t_running - t0,
        migrate_s=t_done - t0,
        qemu_total_ms=info.get("total-time"),
        downtime_ms=info.get("downtime"),
        ram_transferred=ram.get("transferred"),
        uri=uri,
        info=info,
    )


@dataclass(frozen=True)
class BareHop:
    """What one :func:`bare_hop` took; durations in seconds of the host's clock."""

    #: Spawn the destination QEMU until its QMP monitor answers.
    spawn_s: float
    #: Capabilities on both sides, ``migrate-incoming``, source parameters.
    setup_s: float
    #: ``migrate`` issued until the source reports ``completed`` (event-driven).
    migrate_s: float
    #: Until the destination finished loading and runs again after ``cont``.
    resume_s: float
    #: Kill the source and reap it.
    kill_s: float
    #: The whole hop: spawn through kill.
    total_s: float
    #: Guest paused: the source's STOP event until the destination's ``cont`` returned.
    paused_ms: float
    #: QEMU's own figures from the source's final ``query-migrate``.
    qemu_total_ms: int | None
    qemu_downtime_ms: int | None
    qemu_setup_ms: int | None
    ram_transferred: int | None
    iterations: int | None
    info: dict[str, Any] = field(repr=False)


def _status(event: Mapping[str, Any]) -> str:
    return str(cast(Mapping[str, Any], event.get("data") or {}).get("status", ""))


def _event_time(event: Mapping[str, Any]) -> float:
    stamp = event.get("timestamp") or {}
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


async def _next_event(listener: EventListener, deadline: float) -> Mapping[str, Any]:
    try:
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + _left(deadline)):
            return cast(Mapping[str, Any], await listener.get())
    except TimeoutError:
        raise VmferryError(
            ErrorCode.OPERATION_TIMEOUT, "migration did not finish in time"
        ) from None


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


async def _setup_migration(
    src: BareQemu,
    dst: BareQemu,
    host: str,
    src_caps: list[dict[str, object]],
    dst_caps: list[dict[str, object]],
    parameters: Mapping[str, object],
) -> str:
    """Capabilities on both sides, the destination listening (its port), source parameters."""
    await dst.execute("migrate-set-capabilities", {"capabilities": dst_caps})
    await dst.execute("migrate-incoming", {"uri": f"tcp:{host}:0"})
    incoming = cast(dict[str, Any], await dst.execute("query-migrate"))
    ports = [
        a["port"]
        for a in incoming.get("socket-address") or []
        if a.get("type") in ("inet", "ipv4", "ipv6")
    ]
    if not ports:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"destination reports no listening port: {incoming}"
        )
    await src.execute("migrate-set-capabilities", {"capabilities": src_caps})
    if parameters:
        await src.execute("migrate-set-parameters", dict(parameters))
    return f"tcp:{host}:{ports[0]}"


async def bare_hop(
    src: BareQemu,
    argv: Sequence[str],
    qmp: Path,
    *,
    log: Path | None = None,
    host: str = "127.0.0.1",
    capabilities: Mapping[str, bool] = FLOOR_CAPABILITIES,
    parameters: Mapping[str, object] = FLOOR_PARAMETERS,
    limit_s: float = 60.0,
) -> tuple[BareQemu, BareHop]:
    """
    Move a running guest into a new QEMU and kill the old one: the floor of one hop.

    The same work a migration manager must do, and nothing else: spawn the
    destination (*argv* must contain ``-incoming defer -S``), set capabilities
    on both sides, listen, migrate, ``cont`` the destination once it has
    loaded everything, kill the source. Every wait is woken by QEMU's events,
    never by polling, so no granularity is charged to the floor.

    :param src: The running source; it is stopped (killed) on success.
    :param qmp: The QMP socket named in *argv*.
    :return: The destination, now running the guest, and the timings.
    :raise VmferryError: as :func:`bare_migrate`; the destination is
        killed and the source left as it is.
    """
    deadline = time.monotonic() + limit_s
    caps: list[dict[str, object]] = [{"capability": k, "state": v} for k, v in capabilities.items()]
    t0 = time.perf_counter()
    dst = BareQemu(argv, qmp, log=log)
    try:
        await dst.start()
        t_spawned = time.perf_counter()
        with (
            src.qmp.listener(("MIGRATION", "STOP")) as src_events,
            dst.qmp.listener(("MIGRATION", "RESUME")) as dst_events,
        ):
            uri = await _setup_migration(src, dst, host, caps, caps, parameters)
            t_setup = time.perf_counter()

            await src.execute("migrate", {"uri": uri})
            stopped = 0.0
            try:
                while True:
                    event = await _next_event(src_events, deadline)
                    if event["event"] == "STOP":
                        stopped = _event_time(event)
                    elif _status(event) in _TERMINAL:
                        break
            except BaseException:
                with contextlib.suppress(Exception):
                    await src.execute("migrate_cancel")
                raise
            info = cast(dict[str, Any], await src.execute("query-migrate"))
            t_migrated = time.perf_counter()
            if info["status"] != "completed":
                raise VmferryError(
                    ErrorCode.OPERATION_FAILED,
                    f"migration {info['status']}: {info.get('error-desc', 'no reason given')}",
                )
            # The destination finishes loading a moment after the source is done sending.
            while True:
                event = await _next_event(dst_events, deadline)
                if _status(event) == "completed":
                    break
                if _status(event) == "failed":
                    raise VmferryError(ErrorCode.OPERATION_FAILED, "incoming migration failed")
            await dst.execute("cont")
            resumed = time.time()
            t_resumed = time.perf_counter()
    except BaseException:
        await dst.stop()
        raise
    await src.stop()
    t_end = time.perf_counter()
    ram = info.get("ram") or {}
    return dst, BareHop(
        spawn_s=t_spawned - t0,
        setup_s=t_setup - t_spawned,
        migrate_s=t_migrated - t_setup,
        resume_s=t_resumed - t_migrated,
        kill_s=t_end - t_resumed,
        total_s=t_end - t0,
        paused_ms=(resumed - stopped) * 1000 if stopped else float("nan"),
        qemu_total_ms=info.get("total-time"),
        qemu_downtime_ms=info.get("downtime"),
        qemu_setup_ms=info.get("setup-time"),
        ram_transferred=ram.get("transferred"),
        iterations=ram.get("dirty-sync-count"),
        info=info,
    )


# -- storage: the NBD scheme -----------------------------------------------------------------------


@dataclass(frozen=True)
class BareDisk:
    """One virtio disk of a bare guest: its image, format and QEMU node name."""

    image: Path
    fmt: str = "qcow2"
    #: The format node (also the export's and the mirror job's name).
    node: str = "vda"
    index: int = 0


def disk_argv(disk: BareDisk) -> list[str]:
    """``-blockdev`` file + format nodes and a virtio-blk device, as vmferry builds them."""
    protocol = {
        "driver": "file",
        "filename": str(disk.image),
        "node-name": f"file-{disk.node}",
        "auto-read-only": True,
        "discard": "unmap",
    }
    fmt = {"driver": disk.fmt, "node-name": disk.node, "file": f"file-{disk.node}"}
    return [
        "-blockdev",
        json.dumps(protocol),
        "-blockdev",
        json.dumps(fmt),
        "-device",
        f"virtio-blk-pci,drive={disk.node},id=virtio-disk{disk.index}",
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for the NBD server: QEMU cannot report its own)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BareStorageHop:
    """What one :func:`bare_storage_hop` took; durations in seconds of the host's clock."""

    #: ``qemu-img create`` of every destination disk.
    create_s: float
    #: Spawn the destination QEMU until its QMP monitor answers.
    spawn_s: float
    #: NBD server and exports on the destination, NBD client nodes on the source.
    nbd_s: float
    #: ``blockdev-mirror`` of every disk until all are ready (in sync).
    mirror_s: float
    #: Capabilities, ``migrate-incoming``, ``migrate`` until the source stops at pre-switchover.
    migrate_s: float
    #: At the switchover: end the mirrors (drain, no pivot), ``migrate-continue``, completed.
    switchover_s: float
    #: Destination loaded; NBD server stopped; ``cont``.
    resume_s: float
    #: Kill the source and reap it.
    kill_s: float
    #: The whole hop: create through kill.
    total_s: float
    #: Guest paused: the source's STOP event until the destination's ``cont`` returned.
    paused_ms: float
    #: Bytes the mirrors had copied when they were ready (the disks' data).
    disk_bytes: int
    qemu_total_ms: int | None
    qemu_downtime_ms: int | None
    ram_transferred: int | None
    info: dict[str, Any] = field(repr=False)


async def _until_event(
    listener: EventListener, deadline: float, want: str, what: str
) -> Mapping[str, Any]:
    """The next event named *want* (or a MIGRATION/BLOCK_JOB failure: an error)."""
    while True:
        event = await _next_event(listener, deadline)
        name = event["event"]
        data = cast(Mapping[str, Any], event.get("data") or {})
        if name == "BLOCK_JOB_ERROR" or (name == "MIGRATION" and _status(event) == "failed"):
            raise VmferryError(ErrorCode.OPERATION_FAILED, f"{what}: {name} {dict(data)}")
        if name == "BLOCK_JOB_COMPLETED" and data.get("error"):
            raise VmferryError(ErrorCode.OPERATION_FAILED, f"{what}: {data['error']}")
        if name == want:
            return event


async def bare_storage_hop(
    src: BareQemu,
    argv: Sequence[str],
    qmp: Path,
    targets: Sequence[tuple[BareDisk, int]],
    *,
    log: Path | None = None,
    host: str = "127.0.0.1",
    capabilities: Mapping[str, bool] = FLOOR_CAPABILITIES,
    parameters: Mapping[str, object] = FLOOR_PARAMETERS,
    limit_s: float = 300.0,
) -> tuple[BareQemu, BareStorageHop]:
    """
    Move a running guest *and its disks* into a new QEMU: the floor of a storage migration.

    What libvirt does for ``--copy-storage-all``, minus everything else: create each
    destination disk (*targets*: the destination's :class:`BareDisk` and its size in
    bytes; *argv* must open them, see :func:`disk_argv`, and contain ``-incoming defer
    -S``), serve them from the destination over NBD, mirror every source disk (same node
    names) into its export until all are in sync, migrate memory with
    ``pause-before-switchover``, end the mirrors at the switchover (``block-job-cancel``
    of a ready mirror: drain, no pivot), finish, stop the NBD server, ``cont`` the
    destination, kill the source. Waits are woken by QEMU's events.

    :return: The destination, now running the guest, and the timings.
    :raise VmferryError: on any failure; the destination is killed, its disks deleted,
        the source's mirrors cancelled and the source left running.
    """
    deadline = time.monotonic() + limit_s
    caps: list[dict[str, object]] = [{"capability": k, "state": v} for k, v in capabilities.items()]
    src_caps = [*caps, {"capability": "pause-before-switchover", "state": True}]
    port = free_port(host)
    t0 = time.perf_counter()
    for disk, size in targets:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", disk.fmt, str(disk.image), str(size),
            stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise VmferryError(ErrorCode.OPERATION_FAILED, f"qemu-img create: {err.decode()}")
    t_created = time.perf_counter()
    dst = BareQemu(argv, qmp, log=log)
    mirrors: list[str] = []
    try:
        await dst.start()
        t_spawned = time.perf_counter()
        with (
            src.qmp.listener(
                ("MIGRATION", "STOP", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
            ) as src_events,
            dst.qmp.listener(("MIGRATION",)) as dst_events,
        ):
            server = {"type": "inet", "data": {"host": host, "port": str(port)}}
            await dst.execute("nbd-server-start", {"addr": server})
            for disk, _ in targets:
                await dst.execute(
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": f"export-{disk.node}",
                        "node-name": disk.node,
                        "name": disk.node,
                        "writable": True,
                    },
                )
                await src.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": f"nbd-{disk.node}",
                        "server": {"type": "inet", "host": host, "port": str(port)},
                        "export": disk.node,
                    },
                )
            t_nbd = time.perf_counter()
            for disk, _ in targets:
                await src.execute(
                    "blockdev-mirror",
                    {
                        "job-id": f"mirror-{disk.node}",
                        "device": disk.node,
                        "target": f"nbd-{disk.node}",
                        "sync": "full",
                    },
                )
                mirrors.append(f"mirror-{disk.node}")
            disk_bytes = 0
            for _ in targets:
                ready = await _until_event(src_events, deadline, "BLOCK_JOB_READY", "mirror")
                disk_bytes += int(cast(Mapping[str, Any], ready["data"]).get("len", 0))
            t_mirrored = time.perf_counter()

            uri = await _setup_migration(src, dst, host, src_caps, caps, parameters)
            await src.execute("migrate", {"uri": uri})
            stopped = 0.0
            while True:
                event = await _next_event(src_events, deadline)
                if event["event"] == "STOP":
                    stopped = _event_time(event)
                elif _status(event) == "pre-switchover":
                    break
                elif _status(event) in _TERMINAL:
                    raise VmferryError(ErrorCode.OPERATION_FAILED, f"migration {_status(event)}")
            t_migrated = time.perf_counter()
            for job in mirrors:
                await src.execute("block-job-cancel", {"device": job})
            for _ in mirrors:
                await _until_event(src_events, deadline, "BLOCK_JOB_COMPLETED", "mirror end")
            mirrors.clear()
            await src.execute("migrate-continue", {"state": "pre-switchover"})
            while _status(await _next_event(src_events, deadline)) not in _TERMINAL:
                pass
            info = cast(dict[str, Any], await src.execute("query-migrate"))
            if info["status"] != "completed":
                raise VmferryError(
                    ErrorCode.OPERATION_FAILED,
                    f"migration {info['status']}: {info.get('error-desc', 'no reason given')}",
                )
            while True:
                event = await _next_event(dst_events, deadline)
                if _status(event) == "completed":
                    break
                if _status(event) == "failed":
                    raise VmferryError(ErrorCode.OPERATION_FAILED, "incoming migration failed")
            t_switched = time.perf_counter()
            await dst.execute("nbd-server-stop")
            await dst.execute("cont")
            resumed = time.time()
            t_resumed = time.perf_counter()
    except BaseException:
        for job in mirrors:
            with contextlib.suppress(Exception):
                await src.execute("block-job-cancel", {"device": job, "force": True})
        with contextlib.suppress(Exception):
            await src.execute("migrate_cancel")
        await dst.stop()
        for disk, _ in targets:
            disk.image.unlink(missing_ok=True)
        raise
    await src.stop()
    t_end = time.perf_counter()
    ram = info.get("ram") or {}
    return dst, BareStorageHop(
        create_s=t_created - t0,
        spawn_s=t_spawned - t_created,
        nbd_s=t_nbd - t_spawned,
        mirror_s=t_mirrored - t_nbd,
        migrate_s=t_migrated - t_mirrored,
        switchover_s=t_switched - t_migrated,
        resume_s=t_resumed - t_switched,
        kill_s=t_end - t_resumed,
        total_s=t_end - t0,
        paused_ms=(resumed - stopped) * 1000 if stopped else float("nan"),
        disk_bytes=disk_bytes,
        qemu_total_ms=info.get("total-time"),
        qemu_downtime_ms=info.get("downtime"),
        ram_transferred=ram.get("transferred"),
        info=info,
    )
