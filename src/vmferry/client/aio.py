"""The asyncio client: :class:`AsyncClient` and its :class:`AsyncEventStream`.

Same methods, arguments and errors as :class:`vmferry.client.sync.Client`,
awaited.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, TypeVar

import httpx

from vmferry import trace
from vmferry.api.models import (
    ClusterInfo,
    ConsoleOutput,
    DomainInfo,
    DomainStateInfo,
    EvacuateRequest,
    EvacuationInfo,
    Event,
    HostInfo,
    JobStats,
    MaintenanceInfo,
)
from vmferry.api.storage import DiskSource, PoolInfo, VolumeInfo
from vmferry.api.verbs import InterfaceInfo, VncDisplay
from vmferry.client import calls
from vmferry.client import evac_calls as ec
from vmferry.client import migration_calls as mc
from vmferry.client import storage_calls as sc
from vmferry.client import verb_calls as vc
from vmferry.client.calls import Call
from vmferry.client.http1 import CONNECT_TIMEOUT, Answer, _reason
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

    # One line per API call; the requests themselves are in vmferry.client.calls.

    async def host(self, *, request_timeout: float | None = None) -> HostInfo:
        """The daemon's host: name, UUID, versions, features."""
        return await self.run(calls.host(), request_timeout=request_timeout)

    async def maintenance(self, *, request_timeout: float | None = None) -> MaintenanceInfo:
        """Whether the host is in maintenance (no incoming migration, no new domain)."""
        return await self.run(ec.maintenance(), request_timeout=request_timeout)

    async def set_maintenance(
        self, on: bool, reason: str = "", *, request_timeout: float | None = None
    ) -> MaintenanceInfo:
        """Turn maintenance on or off (persisted by the daemon)."""
        return await self.run(ec.set_maintenance(on, reason), request_timeout=request_timeout)

    async def evacuate(
        self, request: EvacuateRequest, *, request_timeout: float | None = None
    ) -> EvacuationInfo:
        """Plan (``dry_run``) or start draining the host; the drain runs in the daemon."""
        return await self.run(ec.evacuate(request), request_timeout=request_timeout)

    async def evacuation(self, *, request_timeout: float | None = None) -> EvacuationInfo:
        """The host's evacuation: plan, per-guest progress and results, ETA."""
        return await self.run(ec.evacuation(), request_timeout=request_timeout)

    async def cluster(self, *, request_timeout: float | None = None) -> ClusterInfo:
        """The cluster's hosts (name, URI, state, free memory) and where each VM runs."""
        return await self.run(calls.cluster(), request_timeout=request_timeout)

    async def list_domains(
        self, all: bool = False, *, request_timeout: float | None = None
    ) -> list[DomainInfo]:
        """Running domains, or with *all* also the defined, inactive ones."""
        return await self.run(calls.list_domains(all), request_timeout=request_timeout)

    async def define(self, xml: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Define (or redefine) a persistent domain from its XML."""
        return await self.run(calls.define(xml), request_timeout=request_timeout)

    async def create(self, xml: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Create and start a transient domain from its XML."""
        return await self.run(calls.create(xml), request_timeout=request_timeout)

    async def undefine(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Remove a domain's definition (a running domain becomes transient)."""
        return await self.run(calls.undefine(name), request_timeout=request_timeout)

    async def start(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Start a defined, inactive domain."""
        return await self.run(calls.start(name), request_timeout=request_timeout)

    async def shutdown(
        self,
        name: str,
        timeout: float = 60.0,
        *,
        request_timeout: float | None = None,
    ) -> DomainInfo:
        """Ask the guest to power off and wait up to *timeout* seconds for it."""
        return await self.run(calls.shutdown(name, timeout), request_timeout=request_timeout)

    async def destroy(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Stop a domain at once (kill its QEMU)."""
        return await self.run(calls.destroy(name), request_timeout=request_timeout)

    async def suspend(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Pause a running domain's vCPUs."""
        return await self.run(calls.suspend(name), request_timeout=request_timeout)

    async def resume(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Let a paused domain run again."""
        return await self.run(calls.resume(name), request_timeout=request_timeout)

    async def dominfo(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """One domain (by name or UUID)."""
        return await self.run(calls.dominfo(name), request_timeout=request_timeout)

    async def domstate(self, name: str, *, request_timeout: float | None = None) -> DomainStateInfo:
        """A domain's state and its reason."""
        return await self.run(calls.domstate(name), request_timeout=request_timeout)

    async def dumpxml(
        self,
        name: str,
        *,
        migratable: bool = False,
        inactive: bool = False,
        request_timeout: float | None = None,
    ) -> str:
        """A domain's XML: live, *inactive* (the definition) or *migratable*."""
        call = calls.dumpxml(name, migratable=migratable, inactive=inactive)
        return await self.run(call, request_timeout=request_timeout)

    async def console(
        self, name: str, offset: int = 0, *, request_timeout: float | None = None
    ) -> ConsoleOutput:
        """Serial console output captured since the domain started, from *offset* on."""
        return await self.run(calls.console(name, offset), request_timeout=request_timeout)

    async def metrics(self, *, request_timeout: float | None = None) -> str:
        """The daemon's Prometheus metrics, in the text exposition format."""
        return await self.run(calls.metrics(), request_timeout=request_timeout)

    # The verbs beyond the life cycle: the requests are in vmferry.client.verb_calls.

    async def reboot(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Ask the guest to reboot (ACPI); returns once asked, the guest may ignore it."""
        return await self.run(vc.reboot(name), request_timeout=request_timeout)

    async def reset(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Reset the machine at once, like its reset button."""
        return await self.run(vc.reset(name), request_timeout=request_timeout)

    async def set_autostart(
        self, name: str, enabled: bool = True, *, request_timeout: float | None = None
    ) -> DomainInfo:
        """Start the persistent domain when the daemon starts (once per host boot), or not."""
        return await self.run(vc.autostart(name, enabled), request_timeout=request_timeout)

    async def set_memory(
        self,
        name: str,
        size_kib: int,
        *,
        live: bool = False,
        config: bool = False,
        request_timeout: float | None = None,
    ) -> DomainInfo:
        """``setmem``: the balloon target (live) and/or ``<currentMemory>`` (config), KiB."""
        call = vc.set_memory(name, size_kib, live=live, config=config)
        return await self.run(call, request_timeout=request_timeout)

    async def set_max_memory(
        self,
        name: str,
        size_kib: int,
        *,
        live: bool = False,
        config: bool = False,
        request_timeout: float | None = None,
    ) -> DomainInfo:
        """``setmaxmem``: ``<memory>`` in KiB; only of the persistent definition."""
        call = vc.set_max_memory(name, size_kib, live=live, config=config)
        return await self.run(call, request_timeout=request_timeout)

    async def interfaces(
        self, name: str, *, request_timeout: float | None = None
    ) -> list[InterfaceInfo]:
        """``domiflist``: the domain's network interfaces."""
        return await self.run(vc.interfaces(name), request_timeout=request_timeout)

    async def vncdisplay(self, name: str, *, request_timeout: float | None = None) -> VncDisplay:
        """Where the running domain's VNC server listens."""
        return await self.run(vc.vncdisplay(name), request_timeout=request_timeout)

    async def domstats(
        self,
        names: Sequence[str] = (),
        groups: Sequence[str] = (),
        *,
        request_timeout: float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Statistics by domain name (all domains if *names* is empty; all groups if empty)."""
        return await self.run(vc.domstats(names, groups), request_timeout=request_timeout)

    # Migration jobs: the requests are in vmferry.client.migration_calls.

    async def jobinfo(
        self, name: str, completed: bool = False, *, request_timeout: float | None = None
    ) -> JobStats:
        """The domain's running migration job, or with *completed* the last finished one."""
        return await self.run(mc.jobinfo(name, completed), request_timeout=request_timeout)

    async def jobabort(
        self, name: str, *, postcopy: bool = False, request_timeout: float | None = None
    ) -> None:
        """Cancel the domain's running migration (the guest stays on the source).

        In post-copy a migration cannot be cancelled; with *postcopy* it is
        paused instead, to be resumed with ``--postcopy-resume``.
        """
        await self.run(mc.jobabort(name, postcopy), request_timeout=request_timeout)

    async def start_postcopy(self, name: str, *, request_timeout: float | None = None) -> None:
        """Switch the domain's running outgoing migration to post-copy now."""
        await self.run(mc.start_postcopy(name), request_timeout=request_timeout)

    async def get_maxdowntime(self, name: str, *, request_timeout: float | None = None) -> int:
        """The longest pause (ms) QEMU may take to complete a live migration."""
        call = mc.get_maxdowntime(name)
        return (await self.run(call, request_timeout=request_timeout)).downtime_ms

    async def set_maxdowntime(
        self, name: str, downtime_ms: int, *, request_timeout: float | None = None
    ) -> None:
        """Set the longest pause (ms) QEMU may take to complete a live migration."""
        await self.run(mc.set_maxdowntime(name, downtime_ms), request_timeout=request_timeout)

    async def get_speed(self, name: str, *, request_timeout: float | None = None) -> int:
        """The migration bandwidth limit in MiB/s (0: unlimited)."""
        return (await self.run(mc.get_speed(name), request_timeout=request_timeout)).bandwidth_mib_s

    async def set_speed(
        self, name: str, bandwidth_mib_s: int, *, request_timeout: float | None = None
    ) -> None:
        """Limit the migration bandwidth to *bandwidth_mib_s* MiB/s (0: unlimited)."""
        await self.run(mc.set_speed(name, bandwidth_mib_s), request_timeout=request_timeout)

    async def pool_list(self, *, request_timeout: float | None = None) -> list[PoolInfo]:
        """The host's storage pools."""
        return await self.run(sc.pool_list(), request_timeout=request_timeout)

    async def vol_list(
        self, pool: str, *, request_timeout: float | None = None
    ) -> list[VolumeInfo]:
        """The volumes of *pool*."""
        return await self.run(sc.vol_list(pool), request_timeout=request_timeout)

    async def vol_info(
        self, pool: str, name: str, *, request_timeout: float | None = None
    ) -> VolumeInfo:
        """Format, capacity, allocation and backing chain of a volume."""
        return await self.run(sc.vol_info(pool, name), request_timeout=request_timeout)

    async def vol_create(
        self,
        pool: str,
        name: str,
        capacity: int,
        fmt: str = "raw",
        backing_vol: str | None = None,
        backing_format: str | None = None,
        *,
        request_timeout: float | None = None,
    ) -> VolumeInfo:
        """Create a volume of *capacity* bytes (qcow2 may have a backing volume)."""
        call = sc.vol_create(pool, name, capacity, fmt, backing_vol, backing_format)
        return await self.run(call, request_timeout=request_timeout)

    async def vol_delete(
        self, pool: str, name: str, *, request_timeout: float | None = None
    ) -> None:
        """Delete a volume no defined domain uses."""
        await self.run(sc.vol_delete(pool, name), request_timeout=request_timeout)

    async def domblklist(
        self, name: str, *, request_timeout: float | None = None
    ) -> list[DiskSource]:
        """The domain's disks and their sources on this host."""
        return await self.run(sc.domblklist(name), request_timeout=request_timeout)

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
