"""The asyncio client: :class:`AsyncClient` and its :class:`AsyncEventStream`.

Same methods, arguments and errors as :class:`vmferry.client.sync.Client`,
awaited.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypedDict, TypeVar

import httpx

from vmferry import trace
from vmferry.api.models import Event
from vmferry.client import calls
from vmferry.client.calls import Call
from vmferry.client.http1 import CONNECT_TIMEOUT, Answer, _reason
from vmferry.client.methods import ClientMethods, request_of
from vmferry.client.transport import (
    DEFAULT_TIMEOUT,
    Endpoint,
    check_status,
    parse_answer,
    parse_event_line,
    parse_uri,
    read_json,
    request_timeout,
    ssl_context,
)
from vmferry.errors import ErrorCode, VmferryError

T = TypeVar("T")
P = ParamSpec("P")


class TransportOptions(TypedDict):
    """Keyword arguments of ``httpx.AsyncHTTPTransport``."""

    uds: str | None
    verify: ssl.SSLContext | bool
    trust_env: bool
    retries: int


def transport_options(endpoint: Endpoint, pki_dir: Path | str | None) -> TransportOptions:
    """How to reach *endpoint*; loads the TLS files only for ``tls://``."""
    return TransportOptions(
        uds=endpoint.socket_path or None,
        verify=ssl_context(endpoint, pki_dir) or False,
        trust_env=False,  # proxies from the environment must not reroute daemon traffic
        retries=0,
    )


def timeout_for(
    call: Call[Any] | None, default: float | None, override: float | None
) -> httpx.Timeout:
    """httpx's form of :func:`~vmferry.client.transport.request_timeout`: connecting stays short."""
    seconds = request_timeout(call, default, override)
    connect = CONNECT_TIMEOUT if seconds is None else min(seconds, CONNECT_TIMEOUT)
    return httpx.Timeout(seconds, connect=connect)


def transport_error(endpoint: Endpoint, exc: httpx.TransportError) -> VmferryError:
    """Map an httpx failure to a :class:`VmferryError` naming the daemon."""
    reason = _httpx_reason(exc)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return VmferryError(
            ErrorCode.CONNECT_FAILED, f"cannot connect to vmferryd at {endpoint.uri}: {reason}"
        )
    # Past this point the request may have reached the daemon: its outcome is unknown.
    if isinstance(exc, httpx.TimeoutException):
        return VmferryError(
            ErrorCode.RPC_FAILED,
            f"no answer from vmferryd at {endpoint.uri} in time ({reason}); "
            "the operation may still complete: check the domain's state",
        )
    return VmferryError(
        ErrorCode.RPC_FAILED, f"lost connection to vmferryd at {endpoint.uri}: {reason}"
    )


def _httpx_reason(exc: BaseException) -> str:
    # httpx wraps httpcore's error, which wraps the OSError: its text is what a user recognises.
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None:
            break
        if isinstance(cause, ssl.SSLError) or (isinstance(cause, OSError) and cause.strerror):
            return _reason(cause)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _answer(response: httpx.Response) -> Answer:
    return Answer(response.status_code, response.content)


def awaited(
    method: Callable[Concatenate[ClientMethods, P], T],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """*method* of :class:`ClientMethods` as a coroutine method of :class:`AsyncClient`."""

    async def send(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call, timeout = request_of(method, *args, **kwargs)
        return await self.run(call, request_timeout=timeout)

    # help() shows the method's own signature and docstring (inspect follows __wrapped__).
    functools.update_wrapper(send, method)
    send.__module__ = __name__
    send.__qualname__ = f"AsyncClient.{method.__name__}"
    return send


class AsyncClient:
    """
    An asyncio connection to one vmferryd; see :class:`vmferry.client.sync.Client`.

    Use ``async with AsyncClient(uri) as client:`` or ``await client.close()``.
    """

    def __init__(
        self,
        uri: str,
        *,
        pki_dir: Path | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.endpoint: Endpoint = parse_uri(uri)
        self.timeout = timeout
        with trace.span("client create"):
            self._http = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(**transport_options(self.endpoint, pki_dir)),
                base_url=self.endpoint.base_url,
                timeout=timeout_for(None, timeout, None),
                trust_env=False,
            )

    @property
    def uri(self) -> str:
        """The daemon's URI, as given (``unix://...``, ``tls://host:port``)."""
        return self.endpoint.uri

    async def close(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        with trace.span("client close"):
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(self, call: Call[T], *, request_timeout: float | None = None) -> T:
        """Send *call* and return its parsed answer."""
        data = await self.fetch(call, request_timeout=request_timeout)
        return parse_answer(self.endpoint, call, data)

    async def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        """Send *call* and return its answer's JSON, unparsed."""
        request = self._http.build_request(
            call.method,
            call.path,
            params=call.params,
            json=call.json_body() if call.content is None else None,
            content=call.content,
            headers=call.headers,
            timeout=timeout_for(call, self.timeout, request_timeout),
        )
        with trace.span("client call", lambda: f"{call.method} {call.path}"):
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                raise transport_error(self.endpoint, exc) from exc
            return read_json(self.endpoint, call, _answer(response))

    # The request methods, from ClientMethods (their arguments, routes and docstrings
    # are there), each made a coroutine sending the same request.
    host = awaited(ClientMethods.host)
    maintenance = awaited(ClientMethods.maintenance)
    set_maintenance = awaited(ClientMethods.set_maintenance)
    evacuate = awaited(ClientMethods.evacuate)
    evacuation = awaited(ClientMethods.evacuation)
    cluster = awaited(ClientMethods.cluster)
    list_domains = awaited(ClientMethods.list_domains)
    define = awaited(ClientMethods.define)
    create = awaited(ClientMethods.create)
    undefine = awaited(ClientMethods.undefine)
    start = awaited(ClientMethods.start)
    shutdown = awaited(ClientMethods.shutdown)
    destroy = awaited(ClientMethods.destroy)
    suspend = awaited(ClientMethods.suspend)
    resume = awaited(ClientMethods.resume)
    dominfo = awaited(ClientMethods.dominfo)
    domstate = awaited(ClientMethods.domstate)
    dumpxml = awaited(ClientMethods.dumpxml)
    console = awaited(ClientMethods.console)
    metrics = awaited(ClientMethods.metrics)
    reboot = awaited(ClientMethods.reboot)
    reset = awaited(ClientMethods.reset)
    set_autostart = awaited(ClientMethods.set_autostart)
    set_memory = awaited(ClientMethods.set_memory)
    set_max_memory = awaited(ClientMethods.set_max_memory)
    interfaces = awaited(ClientMethods.interfaces)
    vncdisplay = awaited(ClientMethods.vncdisplay)
    domstats = awaited(ClientMethods.domstats)
    jobinfo = awaited(ClientMethods.jobinfo)
    jobabort = awaited(ClientMethods.jobabort)
    start_postcopy = awaited(ClientMethods.start_postcopy)
    get_maxdowntime = awaited(ClientMethods.get_maxdowntime)
    set_maxdowntime = awaited(ClientMethods.set_maxdowntime)
    get_speed = awaited(ClientMethods.get_speed)
    set_speed = awaited(ClientMethods.set_speed)
    pool_list = awaited(ClientMethods.pool_list)
    vol_list = awaited(ClientMethods.vol_list)
    vol_info = awaited(ClientMethods.vol_info)
    vol_create = awaited(ClientMethods.vol_create)
    vol_delete = awaited(ClientMethods.vol_delete)
    domblklist = awaited(ClientMethods.domblklist)

    def events(self) -> AsyncEventStream:
        """
        The daemon's domain events: ``async for event in client.events()``,
        or ``async with client.events() as events:`` to be subscribed before
        acting.  No read timeout.
        """
        return AsyncEventStream(self)

    async def open_stream(self, path: str) -> httpx.Response:
        """
        Start a long-lived ``GET`` of *path* (no read timeout) and return the
        streaming response once its status is 2xx; the caller closes it.

        :raise VmferryError: The daemon's error, or ``CONNECT_FAILED``.
        """
        request = self._http.build_request("GET", path, timeout=timeout_for(None, None, None))
        try:
            with trace.span("client session"):
                response = await self._http.send(request, stream=True)
            if not response.is_success:
                await response.aread()
                await response.aclose()
        except httpx.TransportError as exc:
            raise transport_error(self.endpoint, exc) from exc
        if not response.is_success:
            check_status(self.endpoint, "GET", path, _answer(response))
        return response


class AsyncEventStream(AsyncIterator[Event]):
    """The asyncio twin of :class:`vmferry.client.sync.EventStream`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._pending: list[str] = []
        self._closed = False

    async def open(self) -> AsyncEventStream:
        """Subscribe now and wait until the daemon confirms (its first line)."""
        if self._closed:
            raise VmferryError(ErrorCode.OPERATION_INVALID, "the event stream is closed")
        if self._response is None:
            self._response = await self._client.open_stream(calls.EVENTS_PATH)
            self._lines = self._response.aiter_lines()
            line = await self._next_line()
            if line:
                self._pending.append(line)
        return self

    async def close(self) -> None:
        """Stop reading: the daemon ends this subscription."""
        self._closed = True
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        await self.open()
        while True:
            line = self._pending.pop(0) if self._pending else await self._next_line()
            if line is None:
                raise StopAsyncIteration
            event = parse_event_line(self._client.endpoint, line)
            if event is not None:
                return event

    async def _next_line(self) -> str | None:
        assert self._lines is not None
        try:
            return await anext(self._lines, None)
        except httpx.TransportError as exc:
            raise transport_error(self._client.endpoint, exc) from exc
