"""The blocking client: :class:`Client` and its :class:`EventStream`.

It speaks HTTP with the standard library (:mod:`vmferry.client.http1`) and
imports the API's pydantic models only when an answer is parsed into one:
the CLI's fast commands use :meth:`Client.fetch` and never pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from vmferry.client import calls
from vmferry.client import evac_calls as ec
from vmferry.client import migration_calls as mc
from vmferry.client import storage_calls as sc
from vmferry.client import verb_calls as vc
from vmferry.client.calls import Call
from vmferry.client.http1 import (
    Answer,
    SyncStream,
    encode_request,
    sync_exchange,
    sync_request,
)
from vmferry.client.transport import (
    DEFAULT_TIMEOUT,
    Endpoint,
    check_status,
    parse_answer,
    parse_event_line,
    parse_uri,
    read_json,
    ssl_context,
)
from vmferry.client.transport import request_timeout as timeout_of
from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

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

T = TypeVar("T")


class Client:
    """
    A blocking connection to one vmferryd.

    :param uri: ``unix:///path.sock``, ``tls://host:port`` or ``tcp://host:port``.
    :param pki_dir: TLS files for ``tls://`` (default ``$VMFERRY_PKI_DIR``,
        else ``~/.config/vmferry/pki``).
    :param timeout: Seconds to wait for each answer (``None``: forever);
        every method takes ``request_timeout`` to override it once.
    :raise VmferryError: ``INVALID_ARG`` for a bad URI or missing TLS files.

    Nothing is sent until the first call; connection failures raise
    ``CONNECT_FAILED`` from there.  Errors of the daemon are raised as the
    daemon's :class:`VmferryError`, code and message unchanged.
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
        self._ssl: ssl.SSLContext | None = ssl_context(self.endpoint, pki_dir)
        self._streams: list[SyncStream] = []

    @property
    def uri(self) -> str:
        """The daemon's URI, as given (``unix://...``, ``tls://host:port``)."""
        return self.endpoint.uri

    def close(self) -> None:
        """Close the streams still open (each request has its own connection)."""
        for stream in self._streams:
            stream.close()
        self._streams.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, call: Call[T], *, request_timeout: float | None = None) -> T:
        """Send *call* and return its parsed answer."""
        data = self.fetch(call, request_timeout=request_timeout)
        return parse_answer(self.endpoint, call, data)

    def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        """Send *call* and return its answer's JSON, unparsed (no pydantic model)."""
        request = encode_request(
            self.endpoint,
            call.method,
            call.path,
            params=call.params,
            body=call.json_body(),
            headers=call.headers,
        )
        timeout = timeout_of(call, self.timeout, request_timeout)
        answer = sync_exchange(self.endpoint, self._ssl, request, timeout)
        return read_json(self.endpoint, call, answer)

    # One line per API call; the requests themselves are in vmferry.client.calls.

    def metrics(self, *, request_timeout: float | None = None) -> str:
        """The daemon's Prometheus metrics, in the text exposition format."""
        return self.run(calls.metrics(), request_timeout=request_timeout)

    def host(self, *, request_timeout: float | None = None) -> HostInfo:
        """The daemon's host: name, UUID, versions, features."""
        return self.run(calls.host(), request_timeout=request_timeout)

    def maintenance(self, *, request_timeout: float | None = None) -> MaintenanceInfo:
        """Whether the host is in maintenance (no incoming migration, no new domain)."""
        return self.run(ec.maintenance(), request_timeout=request_timeout)

    def set_maintenance(
        self, on: bool, reason: str = "", *, request_timeout: float | None = None
    ) -> MaintenanceInfo:
        """Turn maintenance on or off (persisted by the daemon)."""
        return self.run(ec.set_maintenance(on, reason), request_timeout=request_timeout)

    def evacuate(
        self, request: EvacuateRequest, *, request_timeout: float | None = None
    ) -> EvacuationInfo:
        """Plan (``dry_run``) or start draining the host; the drain runs in the daemon."""
        return self.run(ec.evacuate(request), request_timeout=request_timeout)

    def evacuation(self, *, request_timeout: float | None = None) -> EvacuationInfo:
        """The host's evacuation: plan, per-guest progress and results, ETA."""
        return self.run(ec.evacuation(), request_timeout=request_timeout)

    def cluster(self, *, request_timeout: float | None = None) -> ClusterInfo:
        """The cluster's hosts (name, URI, state, free memory) and where each VM runs."""
        return self.run(calls.cluster(), request_timeout=request_timeout)

    def list_domains(
        self, all: bool = False, *, request_timeout: float | None = None
    ) -> list[DomainInfo]:
        """Running domains, or with *all* also the defined, inactive ones."""
        return self.run(calls.list_domains(all), request_timeout=request_timeout)

    def define(self, xml: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Define (or redefine) a persistent domain from its XML."""
        return self.run(calls.define(xml), request_timeout=request_timeout)

    def create(self, xml: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Create and start a transient domain from its XML."""
        return self.run(calls.create(xml), request_timeout=request_timeout)

    def undefine(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Remove a domain's definition (a running domain becomes transient)."""
        return self.run(calls.undefine(name), request_timeout=request_timeout)

    def start(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Start a defined, inactive domain."""
        return self.run(calls.start(name), request_timeout=request_timeout)

    def shutdown(
        self, name: str, timeout: float = 60.0, *, request_timeout: float | None = None
    ) -> DomainInfo:
        """Ask the guest to power off and wait up to *timeout* seconds for it."""
        return self.run(calls.shutdown(name, timeout), request_timeout=request_timeout)

    def destroy(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Stop a domain at once (kill its QEMU)."""
        return self.run(calls.destroy(name), request_timeout=request_timeout)

    def suspend(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Pause a running domain's vCPUs."""
        return self.run(calls.suspend(name), request_timeout=request_timeout)

    def resume(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Let a paused domain run again."""
        return self.run(calls.resume(name), request_timeout=request_timeout)

    def dominfo(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """One domain (by name or UUID)."""
        return self.run(calls.dominfo(name), request_timeout=request_timeout)

    def domstate(self, name: str, *, request_timeout: float | None = None) -> DomainStateInfo:
        """A domain's state and its reason."""
        return self.run(calls.domstate(name), request_timeout=request_timeout)

    def dumpxml(
        self,
        name: str,
        *,
        migratable: bool = False,
        inactive: bool = False,
        request_timeout: float | None = None,
    ) -> str:
        """A domain's XML: live, *inactive* (the definition) or *migratable*."""
        call = calls.dumpxml(name, migratable=migratable, inactive=inactive)
        return self.run(call, request_timeout=request_timeout)

    def console(
        self, name: str, offset: int = 0, *, request_timeout: float | None = None
    ) -> ConsoleOutput:
        """Serial console output captured since the domain started, from *offset* on."""
        return self.run(calls.console(name, offset), request_timeout=request_timeout)

    # The verbs beyond the life cycle: the requests are in vmferry.client.verb_calls.

    def reboot(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Ask the guest to reboot (ACPI); returns once asked, the guest may ignore it."""
        return self.run(vc.reboot(name), request_timeout=request_timeout)

    def reset(self, name: str, *, request_timeout: float | None = None) -> DomainInfo:
        """Reset the machine at once, like its reset button."""
        return self.run(vc.reset(name), request_timeout=request_timeout)

    def set_autostart(
        self, name: str, enabled: bool = True, *, request_timeout: float | None = None
    ) -> DomainInfo:
        """Start the persistent domain when the daemon starts (once per host boot), or not."""
        return self.run(vc.autostart(name, enabled), request_timeout=request_timeout)

    def set_memory(
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
        return self.run(call, request_timeout=request_timeout)

    def set_max_memory(
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
        return self.run(call, request_timeout=request_timeout)

    def interfaces(self, name: str, *, request_timeout: float | None = None) -> list[InterfaceInfo]:
        """``domiflist``: the domain's network interfaces."""
        return self.run(vc.interfaces(name), request_timeout=request_timeout)

    def vncdisplay(self, name: str, *, request_timeout: float | None = None) -> VncDisplay:
        """Where the running domain's VNC server listens."""
        return self.run(vc.vncdisplay(name), request_timeout=request_timeout)

    def domstats(
        self,
        names: Sequence[str] = (),
        groups: Sequence[str] = (),
        *,
        request_timeout: float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Statistics by domain name (all domains if *names* is empty; all groups if empty)."""
        return self.run(vc.domstats(names, groups), request_timeout=request_timeout)

    # Migration jobs: the requests are in vmferry.client.migration_calls.

    def jobinfo(
        self, name: str, completed: bool = False, *, request_timeout: float | None = None
    ) -> JobStats:
        """The domain's running migration job, or with *completed* the last finished one."""
        return self.run(mc.jobinfo(name, completed), request_timeout=request_timeout)

    def jobabort(
        self, name: str, *, postcopy: bool = False, request_timeout: float | None = None
    ) -> None:
        """Cancel the domain's running migration (the guest stays on the source).

        In post-copy a migration cannot be cancelled; with *postcopy* it is
        paused instead, to be resumed with ``--postcopy-resume``.
        """
        self.run(mc.jobabort(name, postcopy), request_timeout=request_timeout)

    def start_postcopy(self, name: str, *, request_timeout: float | None = None) -> None:
        """Switch the domain's running outgoing migration to post-copy now."""
        self.run(mc.start_postcopy(name), request_timeout=request_timeout)

    def get_maxdowntime(self, name: str, *, request_timeout: float | None = None) -> int:
        """The longest pause (ms) QEMU may take to complete a live migration."""
        return self.run(mc.get_maxdowntime(name), request_timeout=request_timeout).downtime_ms

    def set_maxdowntime(
        self, name: str, downtime_ms: int, *, request_timeout: float | None = None
    ) -> None:
        """Set the longest pause (ms) QEMU may take to complete a live migration."""
        self.run(mc.set_maxdowntime(name, downtime_ms), request_timeout=request_timeout)

    def get_speed(self, name: str, *, request_timeout: float | None = None) -> int:
        """The migration bandwidth limit in MiB/s (0: unlimited)."""
        return self.run(mc.get_speed(name), request_timeout=request_timeout).bandwidth_mib_s

    def set_speed(
        self, name: str, bandwidth_mib_s: int, *, request_timeout: float | None = None
    ) -> None:
        """Limit the migration bandwidth to *bandwidth_mib_s* MiB/s (0: unlimited)."""
        self.run(mc.set_speed(name, bandwidth_mib_s), request_timeout=request_timeout)

    def pool_list(self, *, request_timeout: float | None = None) -> list[PoolInfo]:
        """The host's storage pools."""
        return self.run(sc.pool_list(), request_timeout=request_timeout)

    def vol_list(self, pool: str, *, request_timeout: float | None = None) -> list[VolumeInfo]:
        """The volumes of *pool*."""
        return self.run(sc.vol_list(pool), request_timeout=request_timeout)

    def vol_info(self, pool: str, name: str, *, request_timeout: float | None = None) -> VolumeInfo:
        """Format, capacity, allocation and backing chain of a volume."""
        return self.run(sc.vol_info(pool, name), request_timeout=request_timeout)

    def vol_create(
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
        return self.run(call, request_timeout=request_timeout)

    def vol_delete(self, pool: str, name: str, *, request_timeout: float | None = None) -> None:
        """Delete a volume no defined domain uses."""
        self.run(sc.vol_delete(pool, name), request_timeout=request_timeout)

    def domblklist(self, name: str, *, request_timeout: float | None = None) -> list[DiskSource]:
        """The domain's disks and their sources on this host."""
        return self.run(sc.domblklist(name), request_timeout=request_timeout)

    def vol_upload(self, pool: str, name: str, source: BinaryIO) -> VolumeInfo:
        """Replace a volume's content with what *source* holds (streamed)."""

        def chunks() -> Iterator[bytes]:
            while data := source.read(sc.CHUNK):
                yield data

        call = sc.vol_upload(pool, name)
        request = encode_request(
            self.endpoint,
            call.method,
            call.path,
            headers={"Content-Type": "application/octet-stream"},
            chunked=True,
        )
        stream = sync_request(self.endpoint, self._ssl, request, self.timeout, body=chunks())
        try:
            answer = Answer(stream.status, stream.read())
        finally:
            stream.close()
        return parse_answer(self.endpoint, call, read_json(self.endpoint, call, answer))

    def vol_download(self, pool: str, name: str, dest: BinaryIO) -> int:
        """Write a volume's content to *dest* (streamed); the number of bytes."""
        stream = self.open_stream(sc.volume_path(pool, name, "/data"))
        written = 0
        try:
            for data in stream.iter_bytes():
                dest.write(data)
                written += len(data)
        finally:
            stream.close()
        return written

    def events(self) -> EventStream:
        """
        The daemon's domain events, as they happen.

        Iterate it directly, or enter it (``with client.events() as events:``)
        to be sure the subscription is in place before you act on a domain.
        The stream has no read timeout.
        """
        return EventStream(self)

    def open_stream(self, path: str) -> SyncStream:
        """
        Start a long-lived ``GET`` of *path* (no read timeout) and return the
        streaming response once its status is 2xx; the caller closes it
        (:meth:`close` closes those still open).

        :raise VmferryError: The daemon's error, or ``CONNECT_FAILED``.
        """
        request = encode_request(self.endpoint, "GET", path)
        stream = sync_request(self.endpoint, self._ssl, request, None)
        if not 200 <= stream.status < 300:
            try:
                body = stream.read()
            finally:
                stream.close()
            check_status(self.endpoint, "GET", path, Answer(stream.status, body))
        self._streams = [s for s in self._streams if not s.closed]
        self._streams.append(stream)
        return stream


class EventStream(Iterator["Event"]):
    """
    The NDJSON event stream of ``/v1/events``; iterate it for :class:`Event`.

    Iteration ends when the daemon ends the stream; a broken connection
    raises ``CONNECT_FAILED``.  :meth:`close` (or leaving the ``with``
    block) unsubscribes.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._response: SyncStream | None = None
        self._lines: Iterator[str] | None = None
        self._pending: list[str] = []
        self._closed = False

    def open(self) -> EventStream:
        """
        Subscribe now and wait until the daemon confirms (its first line);
        iterating subscribes by itself if this was not called.
        """
        if self._closed:
            raise VmferryError(ErrorCode.OPERATION_INVALID, "the event stream is closed")
        if self._response is None:
            self._response = self._client.open_stream(calls.EVENTS_PATH)
            self._lines = self._response.iter_lines()
            line = self._next_line()
            if line:
                self._pending.append(line)
        return self

    def close(self) -> None:
        """Stop reading: the daemon ends this subscription."""
        self._closed = True
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> EventStream:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        self.open()
        while True:
            line = self._pending.pop(0) if self._pending else self._next_line()
            if line is None:
                raise StopIteration
            event = parse_event_line(self._client.endpoint, line)
            if event is not None:
                return event

    def _next_line(self) -> str | None:
        assert self._lines is not None
        return next(self._lines, None)
