"""Storage migration (non-shared disks): libvirt's NBD scheme, step by step.

* **Begin** (source): picks the disks to copy (``--migrate-disks``, default:
  every writable disk with a source; CD-ROMs and read-only disks never) and
  puts them in the cookie's ``<nbd>`` with their capacity.
* **Prepare** (destination): creates each missing disk (same size and format;
  for ``--copy-storage-inc`` on top of the backing file that must exist here),
  recording it as created by this migration *before* creating it; an existing
  one is used and never deleted. After QEMU started it serves every copied disk
  over NBD on a port of the migration range and the listen address; the reply
  cookie carries the port.
* **Perform** (source): mirrors every disk into the destination's export and
  waits until all are in sync, then migrates memory; at the switchover
  (vCPUs stopped, stream complete) the mirrors drain and end without pivot;
  the concluded jobs and NBD client nodes stay until the source QEMU is killed
  (Confirm) or, when the guest stays here after all, until :func:`cancel`.
* **Finish** (destination): stops the NBD server, in one batch with the ``cont``.
* Failure anywhere: mirrors force-cancelled, NBD server stopped, the created
  disks deleted; the source runs on from its own disks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vmferry import trace
from vmferry.domain.model import DiskDef, DomainDef
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration import tunnel as mtunnel
from vmferry.migration.cookie import NbdDisk
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.host import MigrationHost
from vmferry.migration.params import MIB, MigrationParams
from vmferry.qemu import blockjob
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.monitor import QmpCommand

log = logging.getLogger(__name__)


def copies_storage(flags: MigrateFlags) -> bool:
    return bool(flags & MigrateFlags.copy_storage())


def _copyable(disk: DiskDef) -> bool:
    return disk.device == "disk" and not disk.readonly and disk.has_source


def select_disks(definition: DomainDef, params: MigrationParams) -> list[DiskDef]:
    """The disks a storage migration copies (libvirt's ``migrate_disks``).

    :raise VmferryError: ``INVALID_ARG`` for a named disk the domain lacks or that
        cannot be copied (a CD-ROM, read-only, or without a source).
    """
    disks = {d.target_dev: d for d in definition.devices.disks}
    wanted = params.disk_targets()
    if not wanted:
        return [d for d in definition.devices.disks if _copyable(d)]
    for target in wanted:
        disk = disks.get(target)
        if disk is None:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"--migrate-disks: domain '{definition.name}' has no disk '{target}'",
            )
        if not _copyable(disk):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"--migrate-disks: disk '{target}' cannot be copied "
                "(CD-ROMs, read-only disks and empty drives stay where they are)",
            )
    return [disks[t] for t in wanted]


# -- source ---------------------------------------------------------------------------------------


async def begin_disks(dom: QemuDomain, params: MigrationParams, *, top_only: bool) -> list[NbdDisk]:
    """Begin: the disks to copy with their capacity (bytes) and backing file, for the cookie."""
    disks = select_disks(dom.definition, params)
    if not disks:
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"domain '{dom.name}' has no disk to copy: drop --copy-storage-all/-inc",
        )
    nodes = await dom.require_monitor().execute("query-named-block-nodes", {"flat": True})
    by_name = {str(n.get("node-name")): n for n in nodes or []}
    out = []
    for disk in disks:
        node = by_name.get(blockjob.format_node(disk.target_dev))
        image = (node or {}).get("image") or {}
        if "virtual-size" not in image:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"QEMU does not know the size of disk '{disk.target_dev}'",
            )
        copied = NbdDisk(disk.target_dev, int(image["virtual-size"]))
        backing = image.get("backing-image") or {}
        if top_only and image.get("backing-filename"):
            # only the top layer moves: the destination creates it over the same backing file
            copied.backing = os.path.basename(str(image["backing-filename"]))
            copied.backing_format = str(backing.get("format", "raw"))
        out.append(copied)
    return out


async def mirror_all(
    dom: QemuDomain,
    stream_host: str,
    cookie_port: int | None,
    *,
    stall_s: float = 0.0,
    tls_creds: str = "",
    tunnel: mtunnel.Sender | None = None,
    meanwhile: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Perform: mirror every selected disk to the destination's NBD server; wait until in sync.

    *meanwhile* runs once every mirror copies, before the wait: the caller's own set-up
    (the migration's parameters) costs no time of its own then.

    *tunnel*: tunnelled, each disk's NBD connection is a socket pair whose end the
    daemon relays to the destination's NBD server (one more pipe, stream ``nbd``).

    *stream_host* is the checked host of the migration stream: the NBD server listens there.
    *tls_creds*: the connections are TLS with these credentials (``--tls``).
    *stall_s*: fail when no byte was copied for this long (0: wait for ever).
    """
    targets = dom.migration.storage_disks
    if not targets:
        return
    if not cookie_port and tunnel is None:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            "the destination did not start an NBD server for the disks (no port in its cookie)",
        )
    flags = MigrateFlags(dom.migration.flags)
    params = dom.migration.params or MigrationParams()
    dom.block_jobs.clear()  # the figures of an earlier attempt
    await stop_relays(dom)  # an earlier migration's (ended with its QEMU's connections)
    for target in targets:
        fd_name = ""
        if tunnel is not None:
            fd_name = f"{mtunnel.NBD_FD_PREFIX}{target}"
            mine = await mtunnel.give_qemu_end(dom.require_monitor(), fd_name)
            dom.migration.nbd_relays.append(
                asyncio.create_task(mtunnel.relay_out(mine, tunnel, mtunnel.NBD_STREAM))
            )
        await blockjob.start_mirror(
            dom,
            target,
            stream_host,
            cookie_port or 0,
            fd_name=fd_name,
            top_only=bool(flags & MigrateFlags.NON_SHARED_INC),
            write_blocking=bool(flags & MigrateFlags.NON_SHARED_SYNCHRONOUS_WRITES),
            speed=params.bandwidth_mib_s * MIB,
            tls_creds=tls_creds,
        )
    if meanwhile is not None:
        await meanwhile()
    await blockjob.wait_ready(
        dom, targets, aborted=lambda: dom.job.abort_requested, stall_s=stall_s
    )


async def complete(dom: QemuDomain) -> None:
    """The switchover: the memory stream completed with the vCPUs stopped; drain the mirrors.

    :raise VmferryError: ``OPERATION_FAILED`` when the mirrors are gone (their QEMU exited
        meanwhile): the device state must not follow disks that were not drained.
    """
    if not dom.migration.storage_disks:
        return
    if not dom.block_jobs:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"the disk mirrors of domain '{dom.name}' are gone at the switchover (QEMU exited)",
        )
    await blockjob.complete_mirrors(dom, dom.migration.storage_disks)


async def cancel(dom: QemuDomain) -> None:
    """Before the source runs on (a failure, a cancelled Confirm): no mirror, no NBD client node.

    Also the end of the mirrors concluded at a successful switchover when the guest
    comes back here; after a completed migration they go with the source QEMU.
    """
    if dom.migration.storage_disks or dom.block_jobs:
        await blockjob.cancel_mirrors(dom)
    await stop_relays(dom)


async def stop_relays(dom: QemuDomain) -> None:
    """Tunnelled, the source: end the NBD connections' relays (QEMU closed its ends, or not)."""
    relays, dom.migration.nbd_relays = dom.migration.nbd_relays, []
    for relay in relays:
        relay.cancel()
    for relay in relays:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await relay


async def progress(dom: QemuDomain) -> dict[str, int]:
    """``disk_*`` statistics of the mirrors, for domjobinfo (empty without storage migration)."""
    if not dom.block_jobs:
        return {}
    try:
        return await blockjob.progress(dom)
    except VmferryError:
        return {}


def final_progress(dom: QemuDomain) -> dict[str, int]:
    """``disk_*`` statistics of the mirrors that ended (their last events' figures)."""
    if not dom.block_jobs:
        return {}
    jobs = dom.block_jobs.values()
    total = sum(j.length for j in jobs)
    processed = sum(j.offset for j in jobs)
    out = {
        "disk_total": total,
        "disk_processed": processed,
        "disk_remaining": max(0, total - processed),
    }
    if all(j.started and j.ready_at for j in jobs):
        # the first mirror's start until the last was in sync: the copy before the memory moved
        start = min(j.started for j in jobs)
        out["disk_sync_ms"] = round((max(j.ready_at for j in jobs) - start) * 1000)
    return out


def with_disk(stats: dict[str, Any], disk: dict[str, int]) -> dict[str, Any]:
    """Add the disk figures to memory *stats*; ``data_*`` covers both, as libvirt's does."""
    if not disk:
        return stats
    out = dict(stats)
    out.update(disk)
    for part in ("total", "processed", "remaining"):
        memory = out.get(f"data_{part}", 0)
        out[f"data_{part}"] = (memory if isinstance(memory, int) else 0) + disk[f"disk_{part}"]
    return out


# -- destination ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewDisk:
    """A disk Prepare creates: where, as what, of which size (and backing file)."""

    path: str
    disk: DiskDef
    copied: NbdDisk


def plan_disks(host: MigrationHost, definition: DomainDef, disks: list[NbdDisk]) -> list[NewDisk]:
    """Prepare, before anything is made: check the disks the source copies; those to create.

    A disk that exists here is copied into and never deleted (not in the list).

    :raise VmferryError: ``INVALID_ARG`` for a disk the domain XML lacks or cannot copy.
    """
    by_target = {d.target_dev: d for d in definition.devices.disks}
    out = []
    for nbd in disks:
        disk = by_target.get(nbd.target)
        if disk is None or not _copyable(disk):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"the source copies disk '{nbd.target[:16]}' that the domain XML does not have",
            )
        path = host.disk_path(disk)
        if host.disk_exists(path):
            log.info("copying disk %s into %s, which exists here", nbd.target, path)
            continue
        out.append(NewDisk(path, disk, nbd))
    return out


async def create_disks(host: MigrationHost, dom: QemuDomain, disks: list[NewDisk]) -> None:
    """Prepare: create *disks*, already recorded (persisted) in ``created_volumes``.

    Crash-safe: a restart finds the record even if the daemon died while creating.
    """
    for new in disks:
        with trace.span("create disk"):
            made = await host.create_disk(new.path, new.disk, new.copied)
        if not made:
            # Someone else made it meanwhile: it is not ours to delete.
            dom.migration.created_volumes.remove(new.path)
            dom.save()


def serve_nbd(
    host: MigrationHost, dom: QemuDomain, address: str, *, tls_creds: str = ""
) -> list[QmpCommand]:
    """The commands serving every disk of ``storage_disks`` over NBD on a migration port.

    The port is taken here (``migration.nbd_port``, released with the job); the caller
    sends the commands (pipelined with its others) before the port goes into the cookie.
    *tls_creds*: only TLS clients with a certificate of the CA (``--tls``).
    """
    port = host.acquire_port()
    dom.migration.nbd_port = port
    return blockjob.nbd_serve(dom.migration.storage_disks, address, port, tls_creds=tls_creds)


async def start_nbd_tunnelled(dom: QemuDomain) -> None:
    """Tunnelled: serve the disks over NBD on a unix socket only this daemon can reach.

    QEMU gets the listening socket as a descriptor (no path it must open); each NBD
    tunnel of the peer is connected to it (:func:`connect_nbd`). No port is opened.
    """
    where = tempfile.mkdtemp(prefix="vmferry-nbd-")  # mode 0700: the daemon's only
    path = os.path.join(where, "nbd.sock")
    dom.migration.nbd_socket = path
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(16)
        mon = dom.require_monitor()
        await mon.execute_with_fd("getfd", {"fdname": mtunnel.NBD_FD_PREFIX}, listener.fileno())
    finally:
        listener.close()  # QEMU holds its own copy
    await mon.execute_all(
        blockjob.nbd_serve(dom.migration.storage_disks, "", 0, fd_name=mtunnel.NBD_FD_PREFIX)
    )


def remove_nbd_socket(dom: QemuDomain) -> None:
    """The tunnelled NBD server's socket and its directory go (the server may stay)."""
    if dom.migration.nbd_socket:
        shutil.rmtree(os.path.dirname(dom.migration.nbd_socket), ignore_errors=True)
        dom.migration.nbd_socket = ""


def connect_nbd(dom: QemuDomain) -> socket.socket:
    """A new connection to the incoming *dom*'s tunnelled NBD server."""
    if not dom.migration.nbd_socket:
        raise VmferryError(ErrorCode.OPERATION_INVALID, f"'{dom.name}' has no tunnelled NBD server")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(dom.migration.nbd_socket)
    except OSError as exc:
        conn.close()
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"the NBD server of '{dom.name}' is gone: {exc}"
        ) from exc
    mtunnel.widen(conn)
    return conn


async def stop_nbd(host: MigrationHost, dom: QemuDomain) -> None:
    """A failure, or restart recovery: the NBD server stops, its port goes back."""
    stop = release_nbd(host, dom)
    mon = dom.monitor
    if stop and mon is not None and mon.connected:
        try:
            await blockjob.nbd_server_stop(mon)
        except VmferryError as err:
            log.warning("domain %s: stopping the NBD server: %s", dom.name, err.message)


def release_nbd(host: MigrationHost, dom: QemuDomain) -> list[QmpCommand]:
    """Finish: the NBD server's port (or socket) goes back; the command that stops the server.

    The caller sends it in one batch with the ``cont`` (:func:`stop_nbd_with`): QEMU runs
    a monitor's commands in order, so the guest never runs while the disks are served,
    and the stop costs no round trip of its own.
    """
    if dom.migration.nbd_port:
        host.release_port(dom.migration.nbd_port)
        dom.migration.nbd_port = 0
    remove_nbd_socket(dom)
    return [("nbd-server-stop", None)] if dom.migration.storage_disks else []


async def stop_nbd_with(dom: QemuDomain, stop: list[QmpCommand], *then: QmpCommand) -> None:
    """Send *stop* (:func:`release_nbd`) and *then* (Finish's ``cont``) in one round trip.

    A failed stop is only logged, as :func:`stop_nbd` does (a server that is not running
    is not an error); :raise VmferryError: the first of *then* that failed.
    """
    if not stop and not then:
        return
    replies = await dom.require_monitor().execute_each([*stop, *then])
    for reply in replies[: len(stop)]:
        if isinstance(reply, VmferryError) and "not running" not in reply.message:
            log.warning("domain %s: stopping the NBD server: %s", dom.name, reply.message)
    for reply in replies[len(stop) :]:
        if isinstance(reply, VmferryError):
            raise reply


async def delete_created(host: MigrationHost, dom: QemuDomain) -> None:
    """A failed incoming migration: delete the disks it created here (QEMU is gone by now)."""
    for path in list(dom.migration.created_volumes):
        try:
            await host.delete_disk(path)
        except VmferryError as err:
            log.error("domain %s: deleting copied disk %s: %s", dom.name, path, err.message)
            continue
        dom.migration.created_volumes.remove(path)
        dom.save()


def forget(dom: QemuDomain) -> None:
    """The migration is over: nothing of it is to be undone any more."""
    dom.migration.storage_disks = []
    dom.migration.created_volumes = []
