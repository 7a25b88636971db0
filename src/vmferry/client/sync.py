"""The blocking client: :class:`Client` and its :class:`EventStream`.

It speaks HTTP with the standard library (:mod:`vmferry.client.http1`) and
imports the API's pydantic models only when an answer is parsed into one:
the CLI's fast commands use :meth:`Client.fetch` and never pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from vmferry.client import calls
from vmferry.client import storage_calls as sc
from vmferry.client.calls import Call
from vmferry.client.http1 import (
    Answer,
    Sent,
    SyncStream,
    encode_request,
    send_request,
    sync_exchange,
    sync_request,
)
from vmferry.client.methods import ClientMethods
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

    from vmferry.api.models import Event
    from vmferry.api.storage import VolumeInfo

T = TypeVar("T")


class Client(ClientMethods):
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

    def _send(self, call: Call[T], request_timeout: float | None) -> T:
        # The request methods are ClientMethods': each sends its request through here.
        return self.run(call, request_timeout=request_timeout)

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
        return self.stream_answer(self.send_stream(path), path)

    def send_stream(self, path: str) -> Sent:
        """The first half of :meth:`open_stream`: the request sent; :meth:`stream_answer` next."""
        return send_request(
            self.endpoint, self._ssl, encode_request(self.endpoint, "GET", path), None
        )

    def stream_answer(self, sent: Sent, path: str) -> SyncStream:
        """The second half of :meth:`open_stream`: the answer to :meth:`send_stream`'s request."""
        stream = sent.answer()
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
