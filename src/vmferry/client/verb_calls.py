"""The requests of the verbs beyond the life cycle (reboot, autostart, domstats, memory...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter

from vmferry.api.models import DomainInfo
from vmferry.api.verbs import AutostartBody, DomainStats, InterfaceInfo, MemoryRequest, VncDisplay
from vmferry.client.calls import Call, domain_path, model
from vmferry.errors import ErrorCode, VmferryError

_interfaces = TypeAdapter(list[InterfaceInfo])


def reboot(name: str) -> Call[DomainInfo]:
    return Call("POST", domain_path(name, "/reboot"), model(DomainInfo))


def reset(name: str) -> Call[DomainInfo]:
    return Call("POST", domain_path(name, "/reset"), model(DomainInfo))


def autostart(name: str, enabled: bool) -> Call[DomainInfo]:
    body = AutostartBody(enabled=enabled)
    return Call("PUT", domain_path(name, "/autostart"), model(DomainInfo), body=body)


def _memory(name: str, what: str, size_kib: int, live: bool, config: bool) -> Call[DomainInfo]:
    # model_construct: the daemon validates (and says what is wrong in its words)
    body = MemoryRequest.model_construct(size_kib=size_kib, live=live, config=config)
    return Call("PUT", domain_path(name, what), model(DomainInfo), body=body)


def set_memory(name: str, size_kib: int, *, live: bool, config: bool) -> Call[DomainInfo]:
    return _memory(name, "/memory", size_kib, live, config)


def set_max_memory(name: str, size_kib: int, *, live: bool, config: bool) -> Call[DomainInfo]:
    return _memory(name, "/maxmemory", size_kib, live, config)


def interfaces(name: str) -> Call[list[InterfaceInfo]]:
    return Call("GET", domain_path(name, "/interfaces"), _interfaces.validate_python)


def vncdisplay(name: str) -> Call[VncDisplay]:
    return Call("GET", domain_path(name, "/vncdisplay"), model(VncDisplay))


def _stats(data: Any) -> dict[str, dict[str, Any]]:
    return DomainStats.model_validate(data).domains


def domstats(
    names: Sequence[str] = (), groups: Sequence[str] = ()
) -> Call[dict[str, dict[str, Any]]]:
    for item in (*names, *groups):
        if not item or "," in item:
            raise VmferryError(ErrorCode.INVALID_ARG, f"invalid domain or group name {item!r}")
    params = {"names": ",".join(names), "groups": ",".join(groups)}
    return Call("GET", "/v1/domstats", _stats, params=params)
