"""The client side of an upgraded pipe: a 101 hands over the connection, else an error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from vmferry.client.pipe import open_pipe
from vmferry.client.transport import parse_uri
from vmferry.errors import ErrorCode, VmferryError

Answer = Callable[[bytes], bytes]


async def _server(answer: Answer, seen: list[bytes]) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(answer(head))
        await writer.drain()
        echo = await reader.read(100)  # after the upgrade: the pipe is raw
        writer.write(echo.upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.close()


class _Sink(asyncio.Protocol):
    def __init__(self, got: asyncio.Queue[bytes]) -> None:
        self.got = got

    def data_received(self, data: bytes) -> None:
        self.got.put_nowait(data)


async def test_upgrade_hands_over_the_connection_with_early_bytes() -> None:
    seen: list[bytes] = []

    def switch(_head: bytes) -> bytes:
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: vmferry-tunnel\r\n\r\nEARLY"

    async for uri in _server(switch, seen):
        transport, early = await open_pipe(
            parse_uri(uri), None, "/v1/x", {"X-Vmferry-Session": "s1"}, "vmferry-tunnel", timeout=10
        )
        assert early == b"EARLY"
        got: asyncio.Queue[bytes] = asyncio.Queue()
        transport.set_protocol(_Sink(got))
        transport.resume_reading()
        transport.write(b"raw bytes")
        assert await asyncio.wait_for(got.get(), 10) == b"RAW BYTES"
        transport.close()
    head = seen[0].decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\n")
    for line in ("Connection: Upgrade", "Upgrade: vmferry-tunnel", "X-Vmferry-Session: s1"):
        assert line in head


async def test_a_refusal_is_the_daemons_error() -> None:
    body = json.dumps({"code": "auth-failed", "message": "not your tunnel"}).encode()

    def refuse(_head: bytes) -> bytes:
        return (
            b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    async for uri in _server(refuse, []):
        with pytest.raises(VmferryError) as err:
            await open_pipe(parse_uri(uri), None, "/v1/x", {}, "vmferry-tunnel", timeout=10)
        assert err.value.code == ErrorCode.AUTH_FAILED
        assert err.value.message == "not your tunnel"


async def test_a_plain_success_is_no_pipe() -> None:
    def ok(_head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"

    async for uri in _server(ok, []):
        with pytest.raises(VmferryError) as err:
            await open_pipe(parse_uri(uri), None, "/v1/x", {}, "vmferry-tunnel", timeout=10)
        assert err.value.code == ErrorCode.RPC_FAILED
