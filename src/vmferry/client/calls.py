"""The requests of the ``/v1`` API, described once for both clients.

Each function returns a :class:`Call`: the HTTP request and how to turn
the answer's JSON into a value.  :meth:`Client.run
<vmferry.client.sync.Client.run>` and :meth:`AsyncClient.run
<vmferry.client.aio.AsyncClient.run>` execute it; their methods are
one-line wrappers.  A new API route needs one function here and one line
in each client.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter

from vmferry.api.models import (
    ClusterInfo,
    ConsoleOutput,
    DomainInfo,
    DomainStateInfo,
    HostInfo,
    ShutdownRequest,
    XmlBody,
)
from vmferry.errors import ErrorCode, VmferryError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

EVENTS_PATH = "/v1/events"
METRICS_PATH = "/metrics"
# The daemon answers a shutdown only once the guest is off: give it this
# much longer than the guest's own timeout before giving up on the answer.
SHUTDOWN_MARGIN = 30.0


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, str] | None = None
    body: BaseModel | None = None
    #: Lower bound for the request timeout (seconds), for calls that wait server-side.
    min_timeout: float | None = None
    headers: dict[str, str] | None = None
    #: A streaming body instead of *body* (the tunnelled migration stream).
    content: AsyncIterable[bytes] | None = None
    #: The answer is text (``/metrics``), given to *parse* as it is, not JSON.
    text: bool = False

    def json_body(self) -> Any:
        return None if self.body is None else self.body.model_dump(mode="json")


def model(cls: type[M]) -> Callable[[Any], M]:
    """A parser for an answer that is one *cls*."""
    return cls.model_validate


def _flag(value: bool) -> str:
    return "true" if value else "false"


def domain_path(name: str, suffix: str = "") -> str:
    """``/v1/domains/{name}{suffix}``; *name* may be a name or a UUID."""
    if not name:
        raise VmferryError(ErrorCode.INVALID_ARG, "a domain name or UUID is required")
    return f"/v1/domains/{quote(name, safe='')}{suffix}"


_domain_list = TypeAdapter(list[DomainInfo])


def host() -> Call[HostInfo]:
    return Call("GET", "/v1/host", model(HostInfo))


def metrics() -> Call[str]:
    return Call("GET", METRICS_PATH, str, text=True)


def cluster() -> Call[ClusterInfo]:
    return Call("GET", "/v1/cluster", model(ClusterInfo))


def list_domains(all: bool = False) -> Call[list[DomainInfo]]:
    return Call("GET", "/v1/domains", _domain_list.validate_python, params={"all": _flag(all)})


def define(xml: str) -> Call[DomainInfo]:
    return Call("POST", "/v1/domains", model(DomainInfo), body=XmlBody(xml=xml))


def create(xml: str) -> Call[DomainInfo]:
    return Call("POST", "/v1/domains/create", model(DomainInfo), body=XmlBody(xml=xml))


def dominfo(name: str) -> Call[DomainInfo]:
    return Call("GET", domain_path(name), model(DomainInfo))


def undefine(name: str) -> Call[DomainInfo]:
    return Call("DELETE", domain_path(name), model(DomainInfo))


def _action(name: str, action: str) -> Call[DomainInfo]:
    return Call("POST", domain_path(name, f"/{action}"), model(DomainInfo))


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
        model(DomainInfo),
        body=ShutdownRequest.model_construct(timeout=timeout),  # the daemon validates
        min_timeout=timeout + SHUTDOWN_MARGIN,
    )


def domstate(name: str) -> Call[DomainStateInfo]:
    return Call("GET", domain_path(name, "/state"), model(DomainStateInfo))


def _xml(data: Any) -> str:
    return XmlBody.model_validate(data).xml


def dumpxml(name: str, *, migratable: bool = False, inactive: bool = False) -> Call[str]:
    params = {"migratable": _flag(migratable), "inactive": _flag(inactive)}
    return Call("GET", domain_path(name, "/xml"), _xml, params=params)


def console(name: str, offset: int = 0) -> Call[ConsoleOutput]:
    if offset < 0:
        raise VmferryError(ErrorCode.INVALID_ARG, f"console offset must be >= 0, not {offset}")
    return Call(
        "GET", domain_path(name, "/console"), model(ConsoleOutput), params={"offset": str(offset)}
    )
