"""The calls of host maintenance and evacuation (``/v1/host/maintenance``, ``/v1/evacuate``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmferry.client.calls import Call, lazy_model

if TYPE_CHECKING:
    from vmferry.api.models import EvacuateRequest, EvacuationInfo, MaintenanceInfo

# Bodies are plain dicts (the daemon validates them); the answers' models are imported
# when parsed, so the CLI imports this module without pydantic (docs/cli.md).


def maintenance() -> Call[MaintenanceInfo]:
    return Call("GET", "/v1/host/maintenance", lazy_model("MaintenanceInfo"))


def set_maintenance(on: bool, reason: str = "") -> Call[MaintenanceInfo]:
    body: dict[str, Any] = {"on": on, "reason": reason}
    return Call("PUT", "/v1/host/maintenance", lazy_model("MaintenanceInfo"), body=body)


def evacuate(request: EvacuateRequest) -> Call[EvacuationInfo]:
    return Call("POST", "/v1/evacuate", lazy_model("EvacuationInfo"), body=request)


def evacuation() -> Call[EvacuationInfo]:
    return Call("GET", "/v1/evacuate", lazy_model("EvacuationInfo"))
