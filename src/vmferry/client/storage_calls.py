"""The requests of the storage APIs (``/v1/pools/...``, ``domblklist``), described once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmferry.client.calls import Call, domain_path, lazy_list, lazy_model, quote
from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    from vmferry.api.storage import DiskSource, PoolInfo, VolumeInfo, VolumeRef

# Bodies are plain dicts (the daemon validates them), the answers' models are
# imported when parsed: the CLI imports this module without pydantic (docs/cli.md).
_STORAGE = "vmferry.api.storage"

#: Bytes per read of a file being uploaded or written by a download.
CHUNK = 1 << 20


def pool_path(pool: str, suffix: str = "") -> str:
    if not pool:
        raise VmferryError(ErrorCode.INVALID_ARG, "a pool name is required")
    return f"/v1/pools/{quote(pool)}{suffix}"


def volume_path(pool: str, name: str, suffix: str = "") -> str:
    if not name:
        raise VmferryError(ErrorCode.INVALID_ARG, "a volume name is required")
    return pool_path(pool, f"/volumes/{quote(name)}{suffix}")


def pool_list() -> Call[list[PoolInfo]]:
    return Call("GET", "/v1/pools", lazy_list("PoolInfo", _STORAGE))


def vol_list(pool: str) -> Call[list[VolumeInfo]]:
    return Call("GET", pool_path(pool, "/volumes"), lazy_list("VolumeInfo", _STORAGE))


def vol_info(pool: str, name: str) -> Call[VolumeInfo]:
    return Call("GET", volume_path(pool, name), lazy_model("VolumeInfo", _STORAGE))


def vol_create(
    pool: str,
    name: str,
    capacity: int,
    fmt: str = "raw",
    backing_vol: str | None = None,
    backing_format: str | None = None,
) -> Call[VolumeInfo]:
    body = {  # the daemon validates
        "name": name,
        "capacity": capacity,
        "format": fmt,
        "backing_vol": backing_vol,
        "backing_format": backing_format,
    }
    return Call("POST", pool_path(pool, "/volumes"), lazy_model("VolumeInfo", _STORAGE), body=body)


def vol_upload(pool: str, name: str) -> Call[VolumeInfo]:
    """The answer of a volume's upload (its body is streamed by each client itself)."""
    return Call("PUT", volume_path(pool, name, "/data"), lazy_model("VolumeInfo", _STORAGE))


def vol_delete(pool: str, name: str) -> Call[VolumeRef]:
    return Call("DELETE", volume_path(pool, name), lazy_model("VolumeRef", _STORAGE))


def domblklist(name: str) -> Call[list[DiskSource]]:
    return Call("GET", domain_path(name, "/blklist"), lazy_list("DiskSource", _STORAGE))
