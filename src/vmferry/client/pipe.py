"""A raw byte pipe to a daemon: an HTTP/1.1 ``Upgrade`` on a connection of its own.

The tunnelled migration (:mod:`vmferry.migration.tunnel`) needs both
directions and no HTTP framing, so it does not go through httpx: this opens
the same kind of connection (``tls://`` with the client certificate and the
daemon's host name checked, ``unix://``, ``tcp://``), sends one request with
``Connection: Upgrade`` and hands over the transport after the daemon's
``101 Switching Protocols``. Any other answer is the daemon's error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from vmferry.client.http1 import Answer
from vmferry.client.transport import Endpoint, check_status, resolve_pki_dir
from vmferry.errors import ErrorCode, VmferryError

#: The most a daemon's answer head (and an error body) may take.
MAX_HEAD = 64 * 1024


class _Handshake(asyncio.Protocol):
    """Collects the answer's head (and an error's body), then stops reading."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.answer: asyncio.Future[None] = loop.create_future()
        self.need = 0  # bytes wanted in buf: head, or head and error body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.answer.done():
            return
        if self.need and len(self.buf) >= self.need:
            self.answer.set_result(None)
        elif not self.need and b"\r\n\r\n" in self.buf:
            self.answer.set_result(None)
        elif len(self.buf) > MAX_HEAD:
            self.answer.set_exception(ConnectionError("the answer's head is too large"))
        if self.answer.done() and self.transport is not None:
            self.transport.pause_reading()  # the rest belongs to whoever takes the pipe

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("the daemon closed the connection"))


def _parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP answer: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), headers


async def open_pipe(
    endpoint: Endpoint,
    pki_dir: Path | str | None,
    path: str,
    headers: dict[str, str],
    protocol: str,
    *,
    timeout: float,
) -> tuple[asyncio.Transport, bytes]:
    """
    ``POST path`` with *headers*, upgraded to *protocol*: the connection's transport
    (reading paused) and the bytes that came after the daemon's answer.

    :raise VmferryError: the daemon's refusal, or ``RPC_FAILED`` if it cannot be reached.
    """
    loop = asyncio.get_running_loop()
    proto = _Handshake(loop)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host or "vmferry"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n{extra}"
        f"Connection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    ).encode("ascii")
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            if endpoint.scheme == "unix":
                transport, _ = await loop.create_unix_connection(
                    lambda: proto, endpoint.socket_path
                )
            else:
                ssl_ctx = None
                if endpoint.scheme == "tls":
                    from vmferry.pki import client_ssl_context

                    ssl_ctx = client_ssl_context(resolve_pki_dir(pki_dir))
                transport, _ = await loop.create_connection(
                    lambda: proto,
                    endpoint.host,
                    endpoint.port,
                    ssl=ssl_ctx,
                    server_hostname=endpoint.host if ssl_ctx is not None else None,
                )
            assert isinstance(transport, asyncio.Transport)
            transport.write(request)
            await proto.answer
            head, _, rest = bytes(proto.buf).partition(b"\r\n\r\n")
            status, answer = _parse_head(head)
            if status == 101:
                if dict(answer).get("upgrade", "").lower() != protocol:
                    raise ConnectionError("the daemon switched to another protocol")
                return transport, rest
            # an error: its body (JSON, with a length) says why
            length = int(dict(answer).get("content-length", "0") or 0)
            proto.need = len(head) + 4 + min(length, MAX_HEAD)
            proto.answer = loop.create_future()
            if len(proto.buf) >= proto.need:
                proto.answer.set_result(None)
            else:
                transport.resume_reading()
            await proto.answer
            body = bytes(proto.buf)[len(head) + 4 : proto.need]
    except (OSError, TimeoutError, ValueError) as exc:
        if transport is not None:
            transport.close()
        raise VmferryError(
            ErrorCode.RPC_FAILED,
            f"cannot open a tunnel to {endpoint.uri}: {exc or type(exc).__name__}",
        ) from exc
    except BaseException:
        if transport is not None:
            transport.close()
        raise
    transport.close()
    check_status(endpoint, "POST", path, Answer(status, body))
    raise VmferryError(
        ErrorCode.RPC_FAILED, f"{endpoint.uri} answered {status} to the tunnel request"
    )
