"""JSON bodies of the verbs beyond the life cycle (reboot, autostart, domstats, memory...)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from vmferry.domain.units import MAX_MEMORY_KIB


class AutostartBody(BaseModel):
    enabled: bool


class MemoryRequest(BaseModel):
    """``setmem`` / ``setmaxmem``: the size and virsh's --live/--config (neither: --current)."""

    size_kib: int = Field(ge=1, le=MAX_MEMORY_KIB)
    live: bool = False
    config: bool = False


class InterfaceInfo(BaseModel):
    """One line of ``domiflist``."""

    interface: str
    type: str
    source: str
    model: str
    mac: str


class VncDisplay(BaseModel):
    listen: str
    port: int
    display: int  # port - 5900, what VNC clients call the display number


class DomainStats(BaseModel):
    """``domstats``: flat ``key: value`` statistics (libvirt's names) by domain name."""

    domains: dict[str, dict[str, Any]] = Field(default_factory=dict)
