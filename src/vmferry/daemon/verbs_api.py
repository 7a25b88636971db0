"""The routes of :mod:`vmferry.daemon.verbs` (reboot, reset, autostart, domstats, ...)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from vmferry.api.models import ERROR_RESPONSES, DomainInfo
from vmferry.api.verbs import AutostartBody, DomainStats, InterfaceInfo, MemoryRequest, VncDisplay
from vmferry.daemon.verbs import DomainVerbs

#: Longest ``names`` list of one domstats call (each name is looked up).
MAX_STATS_QUERY = 64 * 1024


def _split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


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
        names: Annotated[str, Query(max_length=MAX_STATS_QUERY)] = "",
        groups: Annotated[str, Query(max_length=256)] = "",
    ) -> DomainStats:
        # Comma-separated: domain names and UUIDs have no commas (vmferry.domain.xml).
        return DomainStats(domains=await verbs.stats(_split(names), _split(groups)))

    return r
