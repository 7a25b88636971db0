"""The requests of the ``/v1`` API, described once for both clients.

Each function returns a :class:`Call`: the HTTP request and how to turn
the answer's JSON into a value.  :meth:`Client.run
<vmferry.client.sync.Client.run>` and :meth:`AsyncClient.run
<vmferry.client.aio.AsyncClient.run>` execute it; the clients' named
methods are written once, in :class:`vmferry.client.methods.ClientMethods`.
A new API route needs one function here (or in a sibling), one method there
and one line in :class:`~vmferry.client.aio.AsyncClient`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    from collections.abc import AsyncIterable

    from pydantic import BaseModel

    from vmferry.api.models import (
        ClusterInfo,
        ConsoleOutput,
        DomainInfo,
        DomainStateInfo,
        HostInfo,
    )

T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")

EVENTS_PATH = "/v1/events"
METRICS_PATH = "/metrics"
# The daemon answers a shutdown only once the guest is off: give it this
# much longer than the guest's own timeout before giving up on the answer.
SHUTDOWN_MARGIN = 30.0


class Call(NamedTuple, Generic[T]):
    """
    One API request and how to read its answer.

    (A named tuple rather than a dataclass: ``dataclasses`` imports ``inspect``,
    a tenth of a fast CLI command's budget.)
    """

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, str] | None = None
    #: The JSON body: a plain dict (what the CLI sends), or a pydantic model.
    body: Any = None
    #: Lower bound for the request timeout (seconds), for calls that wait server-side.
    min_timeout: float | None = None
    headers: dict[str, str] | None = None
    #: A streaming body instead of *body* (the tunnelled migration stream).
    content: AsyncIterable[bytes] | None = None
    #: The answer is text (``/metrics``), given to *parse* as it is, not JSON.
    text: bool = False

    def json_body(self) -> Any:
        if self.body is None or isinstance(self.body, dict):
            return self.body
        return self.body.model_dump(mode="json")


def model(cls: type[M]) -> Callable[[Any], M]:
    """A parser for an answer that is one *cls*."""
    return cls.model_validate


def lazy_model(name: str, module: str = "vmferry.api.models") -> Callable[[Any], Any]:
    """
    A parser for an answer that is one ``<module>.<name>`` (default
    ``vmferry.api.models``), imported on first use: describing a call must not
    import pydantic (docs/cli.md).
    """

    def parse(data: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name).model_validate(data)

    return parse


def lazy_list(name: str, module: str = "vmferry.api.models") -> Callable[[Any], list[Any]]:
    """A parser for an answer that is a list of ``<module>.<name>``, imported on first use."""

    def parse(data: Any) -> list[Any]:
        import importlib

        from pydantic import TypeAdapter

        cls = getattr(importlib.import_module(module), name)
        result: list[Any] = TypeAdapter(list[cls]).validate_python(data)  # type: ignore[valid-type]
        return result

    return parse


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(text: str) -> str:
    """``urllib.parse.quote(text, safe="")``, without importing urllib.parse (and ipaddress)."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def _flag(value: bool) -> str:
    return "true" if value else "false"


def domain_path(name: str, suffix: str = "") -> str:
    """``/v1/domains/{name}{suffix}``; *name* may be a name or a UUID."""
    if not name:
        raise VmferryError(ErrorCode.INVALID_ARG, "a domain name or UUID is required")
    return f"/v1/domains/{quote(name)}{suffix}"


def _domain_list(data: Any) -> list[DomainInfo]:
    from pydantic import TypeAdapter

    from vmferry.api.models import DomainInfo

    return TypeAdapter(list[DomainInfo]).validate_python(data)


def host() -> Call[HostInfo]:
    return Call("GET", "/v1/host", lazy_model("HostInfo"))


def metrics() -> Call[str]:
    return Call("GET", METRICS_PATH, str, text=True)


def cluster() -> Call[ClusterInfo]:
    return Call("GET", "/v1/cluster", lazy_model("ClusterInfo"))


def list_domains(all: bool = False) -> Call[list[DomainInfo]]:
    return Call("GET", "/v1/domains", _domain_list, params={"all": _flag(all)})


def define(xml: str) -> Call[DomainInfo]:
    return Call("POST", "/v1/domains", lazy_model("DomainInfo"), body={"xml": xml})


def create(xml: str) -> Call[DomainInfo]:
    return Call("POST", "/v1/domains/create", lazy_model("DomainInfo"), body={"xml": xml})


def dominfo(name: str) -> Call[DomainInfo]:
    return Call("GET", domain_path(name), lazy_model("DomainInfo"))


def undefine(name: str) -> Call[DomainInfo]:
    return Call("DELETE", domain_path(name), lazy_model("DomainInfo"))


def _action(name: str, action: str) -> Call[DomainInfo]:
    return Call("POST", domain_path(name, f"/{action}"), lazy_model("DomainInfo"))


def start(name: str) -> Call[DomainInfo]:
    return _action(name, "start")


def destroy(name: str) -> Call[DomainInfo]:
    return _action(name, "destroy")


def suspend(name: str) -> Call[DomainInfo]:
    return _action(name, "suspend")


def resume(name: str) -> Call[DomainInfo]:
    return _action(name, "resume")


def shutdown(name: str, timeout: float = 60.0) -> Call[DomainInfo]:
    if timeout < 0:
        raise VmferryError(ErrorCode.INVALID_ARG, f"shutdown timeout must be >= 0, not {timeout}")
    return Call(
        "POST",
        domain_path(name, "/shutdown"),
        lazy_model("DomainInfo"),
        body={"timeout": float(timeout)},  # the daemon validates
        min_timeout=timeout + SHUTDOWN_MARGIN,
    )


def domstate(name: str) -> Call[DomainStateInfo]:
    return Call("GET", domain_path(name, "/state"), lazy_model("DomainStateInfo"))


def _xml(data: Any) -> str:
    xml = data.get("xml") if isinstance(data, dict) else None
    if not isinstance(xml, str):
        raise ValueError("no 'xml' string in the answer")
    return xml


def dumpxml(name: str, *, migratable: bool = False, inactive: bool = False) -> Call[str]:
    params = {"migratable": _flag(migratable), "inactive": _flag(inactive)}
    return Call("GET", domain_path(name, "/xml"), _xml, params=params)


def console(name: str, offset: int = 0) -> Call[ConsoleOutput]:
    if offset < 0:
        raise VmferryError(ErrorCode.INVALID_ARG, f"console offset must be >= 0, not {offset}")
    return Call(
        "GET",
        domain_path(name, "/console"),
        lazy_model("ConsoleOutput"),
        params={"offset": str(offset)},
    )
