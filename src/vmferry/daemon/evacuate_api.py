"""``/v1`` routes of host maintenance and evacuation."""

from __future__ import annotations

from fastapi import APIRouter

from vmferry.api.models import (
    ERROR_RESPONSES,
    EvacuateRequest,
    EvacuationInfo,
    MaintenanceInfo,
    MaintenanceRequest,
)
from vmferry.daemon.evacuate import Evacuations


def evacuation_routes(evac: Evacuations) -> APIRouter:
    r = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

    @r.get("/host/maintenance")
    async def get_maintenance() -> MaintenanceInfo:
        return evac.driver.maintenance.info

    @r.put("/host/maintenance")
    async def set_maintenance(body: MaintenanceRequest) -> MaintenanceInfo:
        return evac.driver.maintenance.set(body.on, body.reason)

    @r.post("/evacuate")
    async def evacuate(body: EvacuateRequest) -> EvacuationInfo:
        if body.dry_run:
            return await evac.plan(body)
        return await evac.start(body)

    @r.get("/evacuate")
    async def evacuation() -> EvacuationInfo:
        return evac.status()

    return r
