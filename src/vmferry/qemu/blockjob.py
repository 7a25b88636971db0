"""Block jobs and the NBD server: the QEMU side of storage migration.

libvirt's ``qemu_migration.c`` NBD part, on QMP: the destination QEMU
serves each copied disk's top node over NBD (``nbd-server-start``,
``block-export-add``); the source QEMU ``blockdev-add``\\ s an NBD client node
per disk and ``blockdev-mirror``\\ s the disk's top node into it. A job's state
comes from QEMU's events (``JOB_STATUS_CHANGE``, ``BLOCK_JOB_*``), recorded in
:attr:`QemuDomain.block_jobs` by the lifecycle, so every wait here is an event
wait, never a poll.

Switchover semantics, as libvirt's: a mirror stays ``ready`` (in sync, every
guest write also going to the destination) until the source's vCPUs stop at the
end of the memory migration; then a *non-forced* ``block-job-cancel`` lets the
mirror drain and conclude without pivoting, so the destination has every block
and the source keeps its own disk. On failure the cancel is forced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.monitor import Monitor, QmpCommand

log = logging.getLogger(__name__)

#: Prefix of every job and node storage migration makes, so a restart recognises leftovers.
PREFIX = "migrate-"
#: How long a drained (non-forced) cancel may take before it is forced.
DRAIN_WAIT_S = 60.0
#: How long a forced cancel may take.
CANCEL_WAIT_S = 10.0

#: Job statuses after which a job does nothing more (auto-dismiss is off: it stays listed).
OVER = frozenset({"concluded", "null", "aborting"})


@dataclass
class BlockJob:
    """What QEMU's events said about one job."""

    status: str = "created"
    error: str = ""
    length: int = 0  # bytes to copy (grows while the guest writes)
    offset: int = 0  # bytes copied
    cancelled: bool = False  # a BLOCK_JOB_CANCELLED event (forced cancel, or before ready)
    # the last progress look (monotonic seconds, bytes copied): the rate between two looks
    sample: tuple[float, int] | None = None
    # monotonic seconds: the mirror started, and first in sync (0: not yet); how long the
    # copy took before the memory could move (``disk_sync_ms``)
    started: float = 0.0
    ready_at: float = 0.0

    @property
    def over(self) -> bool:
        return self.status in OVER


def format_node(target: str) -> str:
    """The node name of a disk's top (format) node (:mod:`vmferry.qemu.command` names it)."""
    return f"fmt-{target}"


def job_id(target: str) -> str:
    """The mirror job and the NBD client node of disk *target*."""
    return f"{PREFIX}{target}"


def export_name(target: str) -> str:
    """The NBD export of disk *target* (libvirt's ``drive-<alias>``; vmferry.storage's too)."""
    return f"drive-{target}"


# -- events (called by the lifecycle) ---------------------------------------------------------


def on_event(dom: QemuDomain, name: str, data: dict[str, Any]) -> None:
    """Record a block job event of *dom* (``device`` of BLOCK_JOB_* events is the job id)."""
    ident = str(data.get("id") or data.get("device") or "")
    if not ident.startswith(PREFIX):
        return
    job = dom.block_jobs.setdefault(ident, BlockJob())
    if name == "JOB_STATUS_CHANGE":
        job.status = str(data.get("status", job.status))
        return
    job.length = int(data.get("len", job.length) or 0)
    job.offset = int(data.get("offset", job.offset) or 0)
    if name == "BLOCK_JOB_READY":
        job.status = "ready" if job.status in ("created", "running") else job.status
        job.ready_at = job.ready_at or time.monotonic()
    elif name == "BLOCK_JOB_CANCELLED":
        job.cancelled = True
    elif name == "BLOCK_JOB_COMPLETED" and data.get("error"):
        job.error = str(data["error"])
    elif name == "BLOCK_JOB_ERROR":
        job.error = f"{data.get('operation', 'I/O')} error on the {data.get('action', '')} side"


EVENTS = (
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
)


# -- destination: the NBD server ----------------------------------------------------------------


def nbd_serve(
    targets: list[str], host: str, port: int, *, tls_creds: str = "", fd_name: str = ""
) -> list[QmpCommand]:
    """The commands serving disks *targets* over NBD on *host*:*port* (checked by the caller).

    Each disk's top node, writable, under the name :func:`export_name`.
    *tls_creds*: a ``tls-creds-x509`` server object (:mod:`vmferry.qemu.tls_creds`): clients
    must then speak TLS with a certificate of the CA.
    *fd_name*: listen on the socket QEMU got under this name instead (a tunnelled migration).
    """
    args: dict[str, object] = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
    if fd_name:
        args = {"addr": {"type": "fd", "data": {"str": fd_name}}}
    if tls_creds:
        args["tls-creds"] = tls_creds
    out: list[QmpCommand] = [("nbd-server-start", args)]
    for target in targets:
        export = {
            "type": "nbd",
            "id": job_id(target),
            "node-name": format_node(target),
            "name": export_name(target),
            "writable": True,
        }
        out.append(("block-export-add", export))
    return out


async def nbd_server_stop(mon: Monitor) -> None:
    """Stop the NBD server and its exports; one that is not running is not an error."""
    try:
        await mon.execute("nbd-server-stop")
    except VmferryError as err:
        if "not running" not in err.message:
            raise


# -- source: the mirrors ------------------------------------------------------------------------


async def start_mirror(
    dom: QemuDomain,
    target: str,
    host: str,
    port: int,
    *,
    top_only: bool,
    write_blocking: bool,
    speed: int = 0,
    tls_creds: str = "",
    fd_name: str = "",
) -> None:
    """Connect to the destination's export of *target* and mirror the disk into it.

    *fd_name*: the connection is the socket QEMU got under this name (a tunnel's end),
    not *host*:*port*.

    *speed*: bytes/s, 0 unlimited (libvirt applies the migration bandwidth to mirrors too).
    *tls_creds*: a ``tls-creds-x509`` client object: the connection is TLS, the server's
    certificate checked for *host*.
    """
    mon = dom.require_monitor()
    ident = job_id(target)
    node: dict[str, object] = {
        "driver": "nbd",
        "node-name": ident,
        "server": {"type": "inet", "host": host, "port": str(port)},
        "export": export_name(target),
    }
    if fd_name:
        node["server"] = {"type": "fd", "str": fd_name}
    if tls_creds:
        node.update({"tls-creds": tls_creds, "tls-hostname": host})
    mirror = {
        "job-id": ident,
        "device": format_node(target),
        "target": ident,
        # top: the backing chain exists on the destination (--copy-storage-inc)
        "sync": "top" if top_only else "full",
        "copy-mode": "write-blocking" if write_blocking else "background",
        "auto-dismiss": False,  # a concluded job keeps its error until dismissed
        "speed": speed,
    }
    dom.block_jobs[ident] = BlockJob(started=time.monotonic())
    # One round trip: the mirror fails by itself if its target node could not be added.
    added, started = await mon.execute_each([("blockdev-add", node), ("blockdev-mirror", mirror)])
    if isinstance(started, VmferryError):
        dom.block_jobs.pop(ident, None)
        if isinstance(added, VmferryError):
            if not mon.connected:
                raise added
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"copying disk '{target}' of domain '{dom.name}': cannot use the destination's "
                f"NBD server at {host}:{port}: {added.message}",
            ) from None
        await _del_node(mon, ident)
        raise started


async def wait_ready(
    dom: QemuDomain, targets: list[str], *, aborted: Any = None, stall_s: float = 0.0
) -> None:
    """Wait until every mirror of *targets* is ``ready`` (in sync).

    *aborted* is a zero-argument callable: a true answer ends the wait (the
    caller raises its own error). With *stall_s* a look at the jobs' progress every
    third of it fails the wait when no byte moved for that long (a destination that
    stopped reading without closing the connection: QEMU would wait for TCP).

    :raise VmferryError: ``OPERATION_FAILED`` when a mirror failed or QEMU went away,
        ``OPERATION_TIMEOUT`` when the copy stalled.
    """
    ids = [job_id(t) for t in targets]

    def settled() -> bool:
        jobs = [dom.block_jobs.get(i) for i in ids]
        return (
            all(j is not None and j.status == "ready" for j in jobs)
            or any(j is None or j.over or j.error for j in jobs)
            or dom.monitor is None
            or not dom.monitor.connected
            or bool(aborted and aborted())
        )

    every = max(0.2, stall_s / 3) if stall_s > 0 else None
    moved, last = time.monotonic(), -1
    while not await dom.wait_for(settled, every):
        copied = (await progress(dom)).get("disk_processed", 0)
        if copied != last:
            moved, last = time.monotonic(), copied
        elif time.monotonic() - moved >= stall_s:
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT,
                f"copying the disks of domain '{dom.name}' made no progress for {stall_s:g} s "
                "([migration] perform_stall_timeout): the destination stopped receiving",
            )
    if dom.monitor is None or not dom.monitor.connected:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"domain '{dom.name}' went away while its disks were copied"
        )
    for ident in ids:
        job = dom.block_jobs.get(ident)
        if job is None or job.over or job.error:
            why = (job.error if job else "") or "the job ended"
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"copying disk '{ident.removeprefix(PREFIX)}' of domain '{dom.name}' failed: {why}",
            )


async def complete_mirrors(dom: QemuDomain, targets: list[str]) -> None:
    """At the switchover (source vCPUs stopped): drain each mirror and end it without pivot.

    The concluded jobs and their NBD client nodes stay (the source QEMU is killed with
    them, or :func:`cancel_mirrors` removes them when the guest stays here), so neither
    the guest's downtime nor the Finish that ends it waits for their removal.

    :raise VmferryError: ``OPERATION_FAILED`` when a mirror failed before it was in sync
        to the last block (the destination's copy would be incomplete).
    """
    mon = dom.require_monitor()
    ids = [job_id(t) for t in targets]
    # one round trip for all of them (the guest is paused: each one is downtime)
    await mon.execute_all([("block-job-cancel", {"device": i, "force": False}) for i in ids])
    done = await dom.wait_for(
        lambda: all(dom.block_jobs[i].over for i in ids) or not mon.connected, DRAIN_WAIT_S
    )
    failed = [i for i in ids if dom.block_jobs[i].error or not dom.block_jobs[i].over]
    if not done or failed:
        await _dismiss(dom, ids)
        why = "; ".join(f"{i.removeprefix(PREFIX)}: {dom_err(dom, i)}" for i in failed)
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"the last writes of domain '{dom.name}' did not reach the destination ({why})",
        )


def dom_err(dom: QemuDomain, ident: str) -> str:
    job = dom.block_jobs.get(ident)
    return (job.error if job else "") or "did not finish"


async def cancel_mirrors(dom: QemuDomain) -> None:
    """Force-cancel every storage migration job of *dom* and drop its NBD client nodes.

    Also what a restarted daemon does with leftovers: it asks QEMU (``query-jobs``,
    ``query-named-block-nodes``) rather than trusting what it knew.
    """
    mon = dom.monitor
    if mon is None or not mon.connected:
        dom.block_jobs.clear()
        return
    try:
        jobs = await mon.execute("query-jobs")
    except VmferryError as err:
        log.warning("domain %s: listing block jobs: %s", dom.name, err.message)
        return
    ids = [str(j.get("id")) for j in jobs or [] if str(j.get("id", "")).startswith(PREFIX)]
    for ident in ids:
        job = dom.block_jobs.setdefault(ident, BlockJob())
        status = next((str(j.get("status")) for j in jobs if j.get("id") == ident), "")
        job.status = status or job.status
        if job.over:
            continue
        try:
            await mon.execute("block-job-cancel", {"device": ident, "force": True})
        except VmferryError as err:
            log.warning("domain %s: cancelling %s: %s", dom.name, ident, err.message)
    await dom.wait_for(
        lambda: all(dom.block_jobs[i].over for i in ids) or not mon.connected, CANCEL_WAIT_S
    )
    await _dismiss(dom, ids)
    try:
        nodes = await mon.execute("query-named-block-nodes", {"flat": True})
    except VmferryError:
        nodes = []
    for name in {str(n.get("node-name", "")) for n in nodes or []}:
        if name.startswith(PREFIX):
            await _del_node(mon, name)
    dom.block_jobs.clear()


async def _dismiss(dom: QemuDomain, ids: list[str]) -> None:
    mon = dom.monitor
    for ident in ids:
        job = dom.block_jobs.get(ident)
        if mon is not None and mon.connected and job is not None and job.status == "concluded":
            try:
                await mon.execute("job-dismiss", {"id": ident})
            except VmferryError as err:
                log.warning("domain %s: dismissing %s: %s", dom.name, ident, err.message)
        if mon is not None and mon.connected:
            await _del_node(mon, ident)


async def _del_node(mon: Monitor, node: str) -> None:
    try:
        await mon.execute("blockdev-del", {"node-name": node})
    except VmferryError as err:
        if "Failed to find node" not in err.message and "Cannot find" not in err.message:
            log.warning("removing NBD client node %s: %s", node, err.message)


async def progress(dom: QemuDomain) -> dict[str, int]:
    """Disk bytes of the running mirrors (``query-block-jobs``): total, processed, remaining."""
    mon = dom.monitor
    if mon is None or not mon.connected or not dom.block_jobs:
        return {}
    jobs = await mon.execute("query-block-jobs")
    now = time.monotonic()
    total = processed = 0
    rate = 0.0
    for job in jobs or []:
        ident = str(job.get("device", ""))
        if not ident.startswith(PREFIX):
            continue
        length, offset = int(job.get("len", 0)), int(job.get("offset", 0))
        total += length
        processed += offset
        known = dom.block_jobs.setdefault(ident, BlockJob())
        if known.sample is not None and now > known.sample[0]:
            rate += max(0, offset - known.sample[1]) / (now - known.sample[0])
        known.sample = (now, offset)
    return {
        "disk_total": total,
        "disk_processed": processed,
        "disk_remaining": max(0, total - processed),
        "disk_bps": int(rate),
    }
