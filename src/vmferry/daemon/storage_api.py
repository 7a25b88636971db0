"""``/v1`` routes of the storage APIs (pools, volumes, a domain's disks)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from vmferry.api.models import ERROR_RESPONSES
from vmferry.api.storage import DiskSource, PoolInfo, VolumeCreateRequest, VolumeInfo, VolumeRef
from vmferry.daemon.storage import StorageService

#: The upload route: its body is streamed to the volume, limited by the volume's
#: capacity instead of ``[limits] max_body_bytes`` (see vmferry.daemon.guard).
UPLOAD_PATH = r"^/v1/pools/[^/]+/volumes/[^/]+/data$"


def storage_routes(service: StorageService) -> APIRouter:
    r = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

    @r.get("/pools")
    async def pool_list() -> list[PoolInfo]:
        return await service.list_pools()

    @r.get("/pools/{pool}/volumes")
    async def vol_list(pool: str) -> list[VolumeInfo]:
        return await service.list_volumes(pool)

    @r.post("/pools/{pool}/volumes")
    async def vol_create(pool: str, body: VolumeCreateRequest) -> VolumeInfo:
        return await service.create(pool, body)

    @r.get("/pools/{pool}/volumes/{volume}")
    async def vol_info(pool: str, volume: str) -> VolumeInfo:
        return await service.info(pool, volume)

    @r.delete("/pools/{pool}/volumes/{volume}")
    async def vol_delete(pool: str, volume: str) -> VolumeRef:
        await service.delete(pool, volume)
        return VolumeRef(pool=pool, name=volume)

    @r.put("/pools/{pool}/volumes/{volume}/data")
    async def vol_upload(pool: str, volume: str, request: Request) -> VolumeInfo:
        return await service.upload(pool, volume, request.stream())

    @r.get("/pools/{pool}/volumes/{volume}/data")
    async def vol_download(pool: str, volume: str) -> StreamingResponse:
        chunks, size = await service.download(pool, volume)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"Content-Length": str(size)},
        )

    @r.get("/domains/{name}/blklist")
    async def domblklist(name: str) -> list[DiskSource]:
        return await service.blklist(name)

    return r
