"""The calls of host maintenance and evacuation (``/v1/host/maintenance``, ``/v1/evacuate``)."""

from __future__ import annotations

from vmferry.api.models import EvacuateRequest, EvacuationInfo, MaintenanceInfo, MaintenanceRequest
from vmferry.client.calls import Call, model


def maintenance() -> Call[MaintenanceInfo]:
    return Call("GET", "/v1/host/maintenance", model(MaintenanceInfo))


def set_maintenance(on: bool, reason: str = "") -> Call[MaintenanceInfo]:
    body = MaintenanceRequest(on=on, reason=reason)
    return Call("PUT", "/v1/host/maintenance", model(MaintenanceInfo), body=body)


def evacuate(request: EvacuateRequest) -> Call[EvacuationInfo]:
    return Call("POST", "/v1/evacuate", model(EvacuationInfo), body=request)


def evacuation() -> Call[EvacuationInfo]:
    return Call("GET", "/v1/evacuate", model(EvacuationInfo))
