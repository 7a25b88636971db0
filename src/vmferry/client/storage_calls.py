"""The requests of the storage APIs (``/v1/pools/...``, ``domblklist``), described once."""

from __future__ import annotations

from urllib.parse import quote

from pydantic import TypeAdapter

from vmferry.api.storage import (
    DiskSource,
    PoolInfo,
    VolumeCreateRequest,
    VolumeInfo,
    VolumeRef,
)
from vmferry.client.calls import Call, domain_path, model
from vmferry.errors import ErrorCode, VmferryError

#: Bytes per read of a file being uploaded or written by a download.
CHUNK = 1 << 20

_pools = TypeAdapter(list[PoolInfo])
_volumes = TypeAdapter(list[VolumeInfo])
_disks = TypeAdapter(list[DiskSource])


def pool_path(pool: str, suffix: str = "") -> str:
    if not pool:
        raise VmferryError(ErrorCode.INVALID_ARG, "a pool name is required")
    return f"/v1/pools/{quote(pool, safe='')}{suffix}"


def volume_path(pool: str, name: str, suffix: str = "") -> str:
    if not name:
        raise VmferryError(ErrorCode.INVALID_ARG, "a volume name is required")
    return pool_path(pool, f"/volumes/{quote(name, safe='')}{suffix}")


def pool_list() -> Call[list[PoolInfo]]:
    return Call("GET", "/v1/pools", _pools.validate_python)


def vol_list(pool: str) -> Call[list[VolumeInfo]]:
    return Call("GET", pool_path(pool, "/volumes"), _volumes.validate_python)


def vol_info(pool: str, name: str) -> Call[VolumeInfo]:
    return Call("GET", volume_path(pool, name), model(VolumeInfo))


def vol_create(
    pool: str,
    name: str,
    capacity: int,
    fmt: str = "raw",
    backing_vol: str | None = None,
    backing_format: str | None = None,
) -> Call[VolumeInfo]:
    body = VolumeCreateRequest.model_construct(  # the daemon validates
        name=name,
        capacity=capacity,
        format=fmt,
        backing_vol=backing_vol,
        backing_format=backing_format,
    )
    return Call("POST", pool_path(pool, "/volumes"), model(VolumeInfo), body=body)


def vol_delete(pool: str, name: str) -> Call[VolumeRef]:
    return Call("DELETE", volume_path(pool, name), model(VolumeRef))


def domblklist(name: str) -> Call[list[DiskSource]]:
    return Call("GET", domain_path(name, "/blklist"), _disks.validate_python)
