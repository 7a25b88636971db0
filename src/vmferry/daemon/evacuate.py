"""Host evacuation run by the source daemon (issue 9 §3): plan, then drain with p2p migrations.

The drain lives here, not in the CLI: the CLI may leave and the daemon may
restart. ``STATE_DIR/evacuation.json`` holds the plan and every guest's
result and is written before each migration starts and after it ends; a
restarted daemon takes the drain up again (:meth:`Evacuations.resume`):
guests that left are not moved again, the rest are. A failed guest does not
stop the others; a destination that cannot be reached is dropped and the
guests still waiting for it are placed again on the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from vmferry.api.models import EvacuateRequest, EvacuationInfo, EvacuationMove
from vmferry.daemon.state import StateDir, atomic_write
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration import evacplan, linkshare
from vmferry.migration.flags import MigrateFlags
from vmferry.qemu.domain import QemuDomain

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmferry.daemon.migrate import MigrationService

log = logging.getLogger(__name__)

FILE = "evacuation.json"
MIB = 1 << 20
#: The dirty-rate measurement window, ms (QEMU's calc-dirty-rate): one downtime target's worth
#: of dirtying is what decides a switchover, and the first migration waits for it.
MEASURE_MS = 300
#: Pages sampled per GiB of guest memory (QEMU's maximum): 512 left 64 pages of a 128 MiB
#: guest, and readings off by 2x (33 MiB/s read for a guest writing 14).
SAMPLE_PAGES = 4096
# How often a measurement is looked at once its window is over, s.
_MEASURE_POLL_S = 0.05
# How long a guest whose job a restart is still resolving is waited for.
_JOB_WAIT_S = 120.0
# A destination that fails like this is gone: its waiting guests go elsewhere.
_UNREACHABLE = {ErrorCode.CONNECT_FAILED, ErrorCode.RPC_FAILED, ErrorCode.HOST_MAINTENANCE}


class Evacuations:
    """This host's evacuation: at most one at a time."""

    def __init__(self, service: MigrationService) -> None:
        self.service = service
        self.driver = service.driver
        self.request = EvacuateRequest()
        self.info = EvacuationInfo()
        self._task: asyncio.Task[None] | None = None
        self._dead: set[str] = set()
        self._links: dict[str, linkshare.Link] = {}
        self._wake = asyncio.Event()  # a migration ended or left its link

    @property
    def path(self) -> Path:
        return Path(self.driver.state.root) / FILE

    # -- planning --------------------------------------------------------------------------

    async def plan(self, req: EvacuateRequest) -> EvacuationInfo:
        """The plan for *req*, nothing started (``--dry-run``)."""
        guests = await self._guests(req)
        targets = await self._targets(req)
        limits = _limits(req)
        p = evacplan.plan(list(guests.values()), targets, limits)
        info = EvacuationInfo(
            host=self.driver.hostname,
            state="planned",
            per_link=p.per_link,
            link_mib_s=int((targets[0].link_bps if targets else 0) // MIB),
            planned_s=p.total_s,
            eta_s=p.total_s,
        )
        for m in p.in_order():
            g = guests[m.name]
            info.moves.append(
                EvacuationMove(
                    name=m.name,
                    uuid=m.uuid,
                    dest=m.dest,
                    dest_uri=m.dest_uri,
                    memory_mib=m.memory_bytes // MIB,
                    dirty_rate_mib_s=round(g.dirty_rate_bps / MIB, 1),
                    order=m.order,
                    bandwidth_mib_s=round(m.bandwidth_bps / MIB, 1),
                    planned_start_s=round(m.start_s, 2),
                    planned_s=round(m.duration_s, 2),
                    predicted_downtime_ms=(
                        round(m.downtime_ms, 1) if math.isfinite(m.downtime_ms) else None
                    ),
                )
            )
        for name, why in sorted(p.unplaced.items()):
            g = guests[name]
            info.moves.append(
                EvacuationMove(
                    name=name,
                    uuid=g.uuid,
                    memory_mib=g.memory_bytes // MIB,
                    result="skipped",
                    error=why,
                )
            )
        return info

    async def _guests(self, req: EvacuateRequest) -> dict[str, evacplan.Guest]:
        doms = [d for d in self.driver.domains() if d.active]
        rates = await asyncio.gather(*(_dirty_rate(d) for d in doms))
        target = req.downtime_target_ms or self._config_target()
        return {
            d.name: evacplan.Guest(
                d.name,
                d.uuid,
                d.definition.memory_kib * 1024,
                rate,
                math.inf,
                target,
            )
            for d, rate in zip(doms, rates, strict=True)
        }

    def _config_target(self) -> int:
        return self.driver.config.evacuate.downtime_target_ms

    async def _targets(self, req: EvacuateRequest) -> list[evacplan.Target]:
        """The destinations: hosts of the cluster (never an address the client made up)."""
        cluster = await self.driver.cluster_info()
        others = {h.name: h for h in cluster.hosts if not h.self and h.name}
        if req.to:
            unknown = [n for n in req.to if n not in others]
            if unknown:
                raise VmferryError(
                    ErrorCode.INVALID_ARG,
                    f"no host {', '.join(map(repr, unknown))} in this host's cluster "
                    f"(known: {', '.join(sorted(others)) or 'none'}; see 'vmferry cluster list')",
                )
            chosen = [others[n] for n in dict.fromkeys(req.to)]
        else:
            chosen = [h for h in others.values() if h.state == "up" and not h.maintenance]
        down = [h.name for h in chosen if h.state != "up" or not h.uri]
        if down and req.to:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"destination {', '.join(down)} is not up (no fresh heartbeat)",
            )
        closed = [h.name for h in chosen if h.maintenance]
        if closed:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"destination {', '.join(closed)} is in maintenance (it takes no guest); "
                f"end it with 'vmferry maintenance {closed[0]} off' or leave it out of --to",
            )
        link = (req.bandwidth_mib_s or self.driver.config.evacuate.link_mib_s) * MIB
        return [
            evacplan.Target(h.name, h.uri, h.memory_free_kib * 1024, float(link))
            for h in chosen
            if h.name not in self._dead and h.state == "up" and h.uri
        ]

    # -- the drain -------------------------------------------------------------------------

    async def start(self, req: EvacuateRequest) -> EvacuationInfo:
        """Plan and start draining this host; maintenance goes on first (nothing new arrives)."""
        if self._task is not None and not self._task.done():
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"host '{self.driver.hostname}' is already being evacuated; "
                "follow it with 'vmferry evacuate --follow'",
            )
        info = await self.plan(req)
        if not self.driver.maintenance.on:
            self.driver.maintenance.set(True, "evacuation")
        self.request = req
        self._dead.clear()
        self._links.clear()  # a new drain: its own links, with its bandwidth
        info.state = "running"
        info.started = time.time()
        self.info = info
        self._save()
        self._spawn()
        return self.status()

    def resume(self) -> None:
        """At daemon start: take up an evacuation a restart interrupted."""
        raw = StateDir.read_json(self.path) if self.path.exists() else None
        if not isinstance(raw, dict):
            return
        try:
            self.request = EvacuateRequest.model_validate(raw.get("request", {}))
            self.info = EvacuationInfo.model_validate(raw.get("info", {}))
        except ValueError:
            log.warning("%s is not an evacuation record: ignored", self.path)
            return
        if self.info.state != "running":
            return
        here = {d.uuid for d in self.driver.domains() if d.active}
        for m in self.info.moves:
            if m.result == "running":
                # Interrupted: a guest still here goes again, one that left is done.
                m.result = "pending" if m.uuid in here else "done"
                if m.result == "done":
                    m.error = "finished while the daemon restarted"
        log.info("resuming the evacuation of %s", self.driver.hostname)
        self._save()
        self._spawn()

    def _spawn(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        req = self.request
        running: dict[asyncio.Task[None], EvacuationMove] = {}
        try:
            while True:
                self._wake.clear()  # before looking: a link freed from now on wakes the wait
                for m in self._startable(running, req):
                    m.result = "running"
                    if self.info.link_mib_s:
                        m.bandwidth_mib_s = float(self._link(m.dest).share())
                    self._save()  # persisted before the migration starts
                    running[asyncio.create_task(self._move(m, req))] = m
                if not running:
                    break
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    done, _ = await asyncio.wait(
                        [*running, waiter], return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                for ended in [t for t in running if t in done]:
                    running.pop(ended)
                self._save()
        except asyncio.CancelledError:
            for task in running:
                task.cancel()  # the daemon stops: the record says "running", resume redoes it
            raise
        self.info.state = "done"
        self.info.finished = time.time()
        self.info.eta_s = 0.0
        self._save()
        log.info("evacuation of %s done", self.driver.hostname)

    def _link(self, dest: str) -> linkshare.Link:
        """The link to *dest*: the migrations sending on it share its bandwidth."""
        link = self._links.get(dest)
        if link is None:
            link = linkshare.Link(dest, self.info.link_mib_s or 0, changed=self._wake)
            self._links[dest] = link
        return link

    def _on_link(self, m: EvacuationMove) -> bool:
        """Whether *m* counts against the limits: it sets up or sends; Finish/Confirm do not."""
        return m.result == "running" and m.uuid not in self._link(m.dest).left

    def _startable(
        self, running: dict[asyncio.Task[None], EvacuationMove], req: EvacuateRequest
    ) -> list[EvacuationMove]:
        per_link = min(self.info.per_link or 1, req.per_destination)
        busy = [m for m in running.values() if self._on_link(m)]
        out: list[EvacuationMove] = []
        for m in sorted(self.info.moves, key=lambda m: m.order):
            if m.result != "pending":
                continue
            if len(busy) + len(out) >= req.max_parallel:
                break
            mine = [b for b in busy + out if b.dest == m.dest]
            if len(mine) < per_link and not self._first_setting_up(m.dest, mine):
                out.append(m)
        return out

    async def _move(self, m: EvacuationMove, req: EvacuateRequest) -> None:
        t0 = time.monotonic()
        try:
            dom = await self._ready(m)
            if dom is None:
                m.result, m.error = "done", "no longer on this host"
                return
            flags = MigrateFlags.LIVE | MigrateFlags.PEER2PEER
            if dom.persistent is not None:
                flags |= MigrateFlags.PERSIST_DEST | MigrateFlags.UNDEFINE_SOURCE
            params: dict[str, Any] = {
                "bandwidth_mib_s": max(1, int(m.bandwidth_mib_s)),
                "downtime_target_ms": req.downtime_target_ms or self._config_target(),
            }
            if req.deadline_s:
                params["deadline_s"] = req.deadline_s
            link = self._link(m.dest)
            link.left.discard(dom.uuid)
            if self.info.link_mib_s:
                linkshare.assign(dom.uuid, link)  # its cap: its share while it sends
            try:
                result = await self.service.migrate_p2p(dom.name, m.dest_uri, int(flags), params)
            finally:
                linkshare.unassign(dom.uuid)
            m.result = "done"
            m.steps = {k: round(v, 2) for k, v in result.steps.items()}
            self._note_turn(m, link)
            downtime = result.stats.get("downtime_ms")
            m.downtime_ms = float(downtime) if downtime is not None else None
            m.progress = 1.0
        except VmferryError as err:
            m.result, m.error = "failed", err.message
            log.warning("evacuation: %s to %s failed: %s", m.name, m.dest, err.message)
            if err.code in _UNREACHABLE:
                await self._drop_destination(m.dest)
        except Exception as exc:  # one guest's failure must not end the drain
            m.result, m.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("evacuation: %s to %s failed", m.name, m.dest)
        finally:
            m.wall_s = round(time.monotonic() - t0, 2)

    def _first_setting_up(self, dest: str, mine: list[EvacuationMove]) -> bool:
        """Whether the link to *dest* waits for its first migration to set up.

        Until then it sets up that one alone: its Prepare and QEMU get the CPUs, for the
        link idles until it is ready. Later ones set up together behind the one sending: on
        a loaded host a set-up (6 s measured) can take longer than a send (4-5 s).
        """
        link = self._link(dest)
        if not self.info.link_mib_s or link.sending or link.left:
            return False
        return any(not link.ready(b.uuid) for b in mine)

    def _note_turn(self, m: EvacuationMove, link: linkshare.Link) -> None:
        """*m*'s turn on its link, relative to the drain's start (the bench's timeline)."""
        start, end = link.turns.get(m.uuid, (0.0, 0.0))
        if start and self.info.started:
            m.turn_start_s = round(start - self.info.started, 2)
            m.turn_end_s = round(end - self.info.started, 2) if end else None

    async def _ready(self, m: EvacuationMove) -> QemuDomain | None:
        """The guest, once no job (a restart's recovery) holds it; None if it left."""
        deadline = time.monotonic() + _JOB_WAIT_S
        while True:
            dom = next((d for d in self.driver.domains() if d.uuid == m.uuid), None)
            if dom is None or not dom.active:
                return None
            if dom.job.async_job == "none" or time.monotonic() > deadline:
                return dom
            await asyncio.sleep(0.5)

    async def _drop_destination(self, dest: str) -> None:
        """*dest* is gone: place the guests still waiting for it on the other destinations."""
        if dest in self._dead:
            return
        self._dead.add(dest)
        waiting = [m for m in self.info.moves if m.result == "pending" and m.dest == dest]
        if not waiting:
            return
        try:
            fresh = await self.plan(self.request)
        except VmferryError as err:
            for m in waiting:
                m.result, m.error = "failed", f"{dest} is unreachable, no re-plan: {err.message}"
            return
        by_name = {f.name: f for f in fresh.moves}
        last = max((m.order for m in self.info.moves), default=0)
        for m in waiting:
            f = by_name.get(m.name)
            if f is None or f.result == "skipped" or not f.dest:
                m.result = "failed"
                m.error = f"{dest} is unreachable and no other destination has room"
                continue
            m.dest, m.dest_uri, m.bandwidth_mib_s = f.dest, f.dest_uri, f.bandwidth_mib_s
            m.order = last + f.order
        log.info("evacuation: %s dropped, %d guests placed again", dest, len(waiting))

    # -- what the API shows ----------------------------------------------------------------

    def status(self) -> EvacuationInfo:
        info = self.info.model_copy(deep=True)
        for m in info.moves:
            if m.result == "running":
                dom = next((d for d in self.driver.domains() if d.uuid == m.uuid), None)
                m.progress = _progress(dom)
        if info.state == "running":
            info.eta_s = _eta(info)
        return info

    def _save(self) -> None:
        doc = {"request": self.request.model_dump(), "info": self.info.model_dump()}
        atomic_write(self.path, json.dumps(doc))


def _limits(req: EvacuateRequest) -> evacplan.Limits:
    return evacplan.Limits(
        max_parallel=req.max_parallel,
        per_destination=req.per_destination,
        per_link=req.per_destination,
    )


def _progress(dom: QemuDomain | None) -> float:
    """How far a guest's outgoing migration is: 1 - remaining/total of its last statistics."""
    if dom is None:
        return 1.0
    stats = dom.migration.stats or {}
    total = float(stats.get("data_total", 0) or 0)
    left = float(stats.get("data_remaining", 0) or 0)
    return 0.0 if total <= 0 else max(0.0, min(1.0, 1.0 - left / total))


def _eta(info: EvacuationInfo) -> float:
    """Seconds left: the plan's work still to do, spread as the plan spreads it."""
    work = sum(m.planned_s for m in info.moves if m.result != "skipped")
    if work <= 0 or info.planned_s <= 0:
        return 0.0
    left = sum(
        m.planned_s * (1.0 - m.progress) for m in info.moves if m.result in ("pending", "running")
    )
    return round(left * info.planned_s / work, 1)


async def _dirty_rate(dom: QemuDomain) -> float:
    """The guest's dirty rate in bytes/s (QEMU's calc-dirty-rate); 0 when it cannot tell."""
    mon = dom.monitor
    if mon is None or not mon.connected:
        return 0.0
    try:
        await mon.execute(
            "calc-dirty-rate",
            {
                "calc-time": MEASURE_MS,
                "calc-time-unit": "millisecond",
                "sample-pages": SAMPLE_PAGES,
            },
        )
        await asyncio.sleep(MEASURE_MS / 1000.0)
        for _ in range(200):
            got = await mon.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
            if got.get("status") == "measured":
                return float(got.get("dirty-rate", 0)) * MIB
            await asyncio.sleep(_MEASURE_POLL_S)
    except VmferryError as err:
        log.info("%s: no dirty rate: %s", dom.name, err.message)
    return 0.0
