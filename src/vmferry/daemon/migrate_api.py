"""``/v1`` routes of the migration APIs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from vmferry.api.models import (
    ERROR_RESPONSES,
    BeginReply,
    ConfirmRequest,
    CookieBody,
    DowntimeBody,
    FinishRequest,
    JobStats,
    MigrationRequest,
    MigrationResult,
    PeerMigrationRequest,
    Perform2Request,
    PerformRequest,
    PrepareReply,
    PrepareRequest,
    SpeedBody,
    StepReply,
)
from vmferry.daemon.migrate import MigrationService
from vmferry.daemon.peer import HIJACK_KEY
from vmferry.errors import VmferryError

Session = Annotated[str, Header(alias="X-Vmferry-Session")]
Stream = Annotated[str, Header(alias="X-Vmferry-Stream", max_length=16)]


def migration_routes(service: MigrationService) -> APIRouter:
    r = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

    @r.get("/session")
    async def session() -> StreamingResponse:
        return StreamingResponse(
            service.driver.sessions.stream(), media_type="application/x-ndjson"
        )

    @r.post("/domains/{name}/migrate/begin")
    async def begin(name: str, body: MigrationRequest, session: Session = "") -> BeginReply:
        xml, cookie = await service.migrate_begin(name, body.flags, body.params, session)
        return BeginReply(xml=xml, cookie=cookie)

    @r.post("/migrate/prepare")
    async def prepare(body: PrepareRequest, session: Session = "") -> PrepareReply:
        uri, cookie = await service.migrate_prepare(
            body.xml, body.cookie, body.flags, body.params, session
        )
        return PrepareReply(uri=uri, cookie=cookie)

    @r.post("/domains/{name}/migrate/perform")
    async def perform(name: str, body: PerformRequest) -> CookieBody:
        return CookieBody(
            cookie=await service.migrate_perform(name, body.cookie, body.uri, body.peer_uri)
        )

    @r.post("/domains/{name}/migrate/perform2")
    async def perform2(name: str, body: Perform2Request) -> CookieBody:
        await service.migrate_perform2(name, body.uri, body.flags, body.params, body.peer_uri)
        return CookieBody()

    @r.post("/domains/{name}/migrate/finish")
    async def finish(name: str, body: FinishRequest) -> StepReply:
        cookie = await service.migrate_finish(name, body.cookie, body.cancelled, body.v3)
        # The completed job in the reply: the client needs no jobinfo call after.
        stats = None if body.cancelled else service.completed_stats(name)
        return StepReply(cookie=cookie, stats=stats)

    @r.post("/domains/{name}/migrate/tunnel")
    async def tunnel(
        name: str, request: Request, session: Session = "", stream: Stream = ""
    ) -> CookieBody:
        # Upgrade: vmferry-tunnel; after the checks the connection becomes the stream's pipe
        take = request.scope.get("extensions", {}).get(HIJACK_KEY)
        await service.migrate_tunnel(name, session, take, stream)
        return CookieBody()

    @r.post("/domains/{name}/migrate/confirm")
    async def confirm(name: str, body: ConfirmRequest) -> StepReply:
        await service.migrate_confirm(name, body.cookie, body.cancelled)
        return StepReply(stats=None if body.cancelled else service.completed_stats(name))

    @r.post("/domains/{name}/migrate")
    async def migrate_p2p(name: str, body: PeerMigrationRequest) -> MigrationResult:
        return await service.migrate_p2p(name, body.dest_uri, body.flags, body.params)

    @r.get("/domains/{name}/jobinfo")
    async def jobinfo(name: str, completed: bool = False) -> JobStats:
        try:
            dom = service.lookup(name)
        except VmferryError:
            if completed and name in service.driver.last_completed:
                return JobStats(type="completed", stats=service.driver.last_completed[name])
            raise
        return await service.job_info(dom, completed=completed)

    @r.post("/domains/{name}/jobabort")
    async def jobabort(name: str, postcopy: bool = False) -> CookieBody:
        await service.job_abort(service.lookup(name), postcopy_pause=postcopy)
        return CookieBody()

    @r.post("/domains/{name}/migrate/postcopy")
    async def start_postcopy(name: str) -> CookieBody:
        await service.start_postcopy(service.lookup(name))
        return CookieBody()

    @r.get("/domains/{name}/migrate/maxdowntime")
    async def get_downtime(name: str) -> DowntimeBody:
        return DowntimeBody(downtime_ms=await service.get_max_downtime(service.lookup(name)))

    @r.put("/domains/{name}/migrate/maxdowntime")
    async def set_downtime(name: str, body: DowntimeBody) -> DowntimeBody:
        await service.set_max_downtime(service.lookup(name), body.downtime_ms)
        return body

    @r.get("/domains/{name}/migrate/speed")
    async def get_speed(name: str) -> SpeedBody:
        return SpeedBody(bandwidth_mib_s=await service.get_speed(service.lookup(name)))

    @r.put("/domains/{name}/migrate/speed")
    async def set_speed(name: str, body: SpeedBody) -> SpeedBody:
        await service.set_speed(service.lookup(name), body.bandwidth_mib_s)
        return body

    return r
