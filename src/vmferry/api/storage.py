"""JSON bodies of the storage routes (pools, volumes, a domain's disks)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: Largest volume a client may ask for (1 PiB): a bound, not a promise the pool has it.
MAX_CAPACITY = 1 << 50


class PoolInfo(BaseModel):
    """``pool-list``: one pool and its file system's numbers."""

    name: str
    path: str
    capacity: int  # bytes of the file system
    available: int  # bytes free for the daemon
    volumes: int


class BackingVolume(BaseModel):
    name: str
    format: str


class VolumeInfo(BaseModel):
    """``vol-info``: *backing* is the chain below the volume, nearest first."""

    pool: str
    name: str
    path: str
    format: str
    capacity: int
    allocation: int
    backing: list[BackingVolume] = Field(default_factory=list)


class VolumeRef(BaseModel):
    """A volume by pool and name (``vol-delete``'s answer)."""

    pool: str
    name: str


class VolumeCreateRequest(BaseModel):
    """``vol-create-as``: a new volume, optionally over a backing volume of the same pool."""

    name: str = Field(min_length=1, max_length=128)
    capacity: int = Field(gt=0, le=MAX_CAPACITY)
    format: Literal["raw", "qcow2"] = "raw"
    backing_vol: str | None = Field(default=None, min_length=1, max_length=128)
    backing_format: Literal["raw", "qcow2"] | None = None


class DiskSource(BaseModel):
    """``domblklist``: one disk and where its medium is on this host."""

    target: str
    device: str
    type: str  # file or volume
    format: str
    source: str  # the file, or the volume's file on this host ("" when not resolvable)
    pool: str = ""
    volume: str = ""
