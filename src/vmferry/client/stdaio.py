"""An asyncio client on the standard library: what ``vmferry migrate`` drives the protocol with.

:class:`StdAsyncClient` has the part of :class:`~vmferry.client.aio.AsyncClient`
that :func:`vmferry.client.migrate.migrate` uses (``uri``, ``fetch``, ``run``,
``open_stream``) without httpx, whose import alone costs more than a CLI
command may take (issue 10).  The library's :class:`AsyncClient` stays the
full-featured one.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from vmferry.client.calls import Call
from vmferry.client.http1 import Answer, AsyncStream, async_exchange, async_request, encode_request
from vmferry.client.transport import (
    DEFAULT_TIMEOUT,
    Endpoint,
    check_status,
    parse_answer,
    parse_uri,
    read_json,
    request_timeout,
    ssl_context,
)

if TYPE_CHECKING:
    from pathlib import Path

T = TypeVar("T")


class StdAsyncClient:
    """
    An asyncio connection to one vmferryd (one HTTP connection per request).

    :raise VmferryError: As :class:`~vmferry.client.sync.Client`.
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
        self._ssl = ssl_context(self.endpoint, pki_dir)
        self._streams: list[AsyncStream] = []

    @property
    def uri(self) -> str:
        return self.endpoint.uri

    async def close(self) -> None:
        """Close the streams still open."""
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.aclose()

    async def __aenter__(self) -> StdAsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        """Send *call* and return its answer's JSON, unparsed."""
        return await self._fetch(call, request_timeout)

    async def _fetch(self, call: Call[Any], override: float | None) -> Any:
        request = encode_request(
            self.endpoint,
            call.method,
            call.path,
            params=call.params,
            body=call.json_body(),
            headers=call.headers,
        )
        timeout = request_timeout(call, self.timeout, override)
        answer = await async_exchange(self.endpoint, self._ssl, request, timeout)
        return read_json(self.endpoint, call, answer)

    async def run(self, call: Call[T], *, request_timeout: float | None = None) -> T:
        """Send *call* and return its parsed answer (imports the API models)."""
        return parse_answer(self.endpoint, call, await self._fetch(call, request_timeout))

    async def open_stream(self, path: str) -> AsyncStream:
        """A long-lived ``GET`` of *path* (no read timeout) once its status is 2xx."""
        stream = await async_request(
            self.endpoint, self._ssl, encode_request(self.endpoint, "GET", path), None
        )
        if not 200 <= stream.status < 300:
            try:
                body = await stream.read()
            finally:
                await stream.aclose()
            check_status(self.endpoint, "GET", path, Answer(stream.status, body))
        self._streams.append(stream)
        return stream
