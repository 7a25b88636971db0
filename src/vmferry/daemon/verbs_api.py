"""The routes of :mod:`vmferry.daemon.verbs` (reboot, reset, autostart, domstats, ...)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from vmferry.api.models import ERROR_RESPONSES, DomainInfo
from vmferry.api.verbs import AutostartBody, DomainStats, InterfaceInfo, MemoryRequest, VncDisplay
from vmferry.daemon.verbs import DomainVerbs

#: Most names one domstats call may list (each is looked up).
MAX_STATS_NAMES = 1024


def verb_routes(verbs: DomainVerbs) -> APIRouter:
    r = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
    driver = verbs.driver

    @r.post("/domains/{name}/reboot")
    async def reboot(name: str) -> DomainInfo:
        return driver.info(await verbs.reboot(driver.lookup(name)))

    @r.post("/domains/{name}/reset")
    async def reset(name: str) -> DomainInfo:
        return driver.info(await verbs.reset(driver.lookup(name)))

    @r.put("/domains/{name}/autostart")
    async def autostart(name: str, body: AutostartBody) -> DomainInfo:
        return driver.info(await verbs.set_autostart(driver.lookup(name), body.enabled))

    @r.put("/domains/{name}/memory")
    async def setmem(name: str, body: MemoryRequest) -> DomainInfo:
        return driver.info(await verbs.set_memory(driver.lookup(name), body))

    @r.put("/domains/{name}/maxmemory")
    async def setmaxmem(name: str, body: MemoryRequest) -> DomainInfo:
        return driver.info(await verbs.set_max_memory(driver.lookup(name), body))

    @r.get("/domains/{name}/interfaces")
    async def domiflist(name: str) -> list[InterfaceInfo]:
        return verbs.interfaces(driver.lookup(name))

    @r.get("/domains/{name}/vncdisplay")
    async def vncdisplay(name: str) -> VncDisplay:
        return await verbs.vncdisplay(driver.lookup(name))

    @r.get("/domstats")
    async def domstats(
        name: Annotated[list[str] | None, Query(max_length=MAX_STATS_NAMES)] = None,
        group: Annotated[list[str] | None, Query(max_length=16)] = None,
    ) -> DomainStats:
        return DomainStats(domains=await verbs.stats(name or [], group or []))

    return r
