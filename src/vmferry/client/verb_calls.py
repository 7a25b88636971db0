"""The requests of the verbs beyond the life cycle (reboot, autostart, domstats, memory...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmferry.client.calls import Call, domain_path, lazy_list, lazy_model
from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    from vmferry.api.models import DomainInfo
    from vmferry.api.verbs import InterfaceInfo, VncDisplay

# Bodies are plain dicts (the daemon validates them), the answers' models are
# imported when parsed: the CLI imports this module without pydantic (docs/cli.md).
_VERBS = "vmferry.api.verbs"


def reboot(name: str) -> Call[DomainInfo]:
    return Call("POST", domain_path(name, "/reboot"), lazy_model("DomainInfo"))


def reset(name: str) -> Call[DomainInfo]:
    return Call("POST", domain_path(name, "/reset"), lazy_model("DomainInfo"))


def autostart(name: str, enabled: bool) -> Call[DomainInfo]:
    body = {"enabled": enabled}
    return Call("PUT", domain_path(name, "/autostart"), lazy_model("DomainInfo"), body=body)


def _memory(name: str, what: str, size_kib: int, live: bool, config: bool) -> Call[DomainInfo]:
    # the daemon validates (and says what is wrong in its words)
    body = {"size_kib": size_kib, "live": live, "config": config}
    return Call("PUT", domain_path(name, what), lazy_model("DomainInfo"), body=body)


def set_memory(name: str, size_kib: int, *, live: bool, config: bool) -> Call[DomainInfo]:
    return _memory(name, "/memory", size_kib, live, config)


def set_max_memory(name: str, size_kib: int, *, live: bool, config: bool) -> Call[DomainInfo]:
    return _memory(name, "/maxmemory", size_kib, live, config)


def interfaces(name: str) -> Call[list[InterfaceInfo]]:
    return Call("GET", domain_path(name, "/interfaces"), lazy_list("InterfaceInfo", _VERBS))


def vncdisplay(name: str) -> Call[VncDisplay]:
    return Call("GET", domain_path(name, "/vncdisplay"), lazy_model("VncDisplay", _VERBS))


def _stats(data: Any) -> dict[str, dict[str, Any]]:
    from vmferry.api.verbs import DomainStats

    return DomainStats.model_validate(data).domains


def domstats(
    names: Sequence[str] = (), groups: Sequence[str] = ()
) -> Call[dict[str, dict[str, Any]]]:
    for item in (*names, *groups):
        if not item or "," in item:
            raise VmferryError(ErrorCode.INVALID_ARG, f"invalid domain or group name {item!r}")
    params = {"names": ",".join(names), "groups": ",".join(groups)}
    return Call("GET", "/v1/domstats", _stats, params=params)
