"""The tunnel's relay threads over a real mutual-TLS connection (as between two daemons).

Each side's transport is detached from the event loop (the TLS session taken as it
is) and relayed by threads: bytes arrive complete and in order both ways, including
those the loop had already read before the hand-over; the ends pass through; a
cancelled relay lets go of both connections.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from vmferry.migration import tunnel
from vmferry.pki import client_ssl_context, init_pki, server_ssl_context


class _Held(asyncio.Protocol):
    """Holds a new connection with reading paused, as a hijacked request has it."""

    def __init__(self, got: asyncio.Queue[asyncio.Transport], pause: bool = True) -> None:
        self.got = got
        self.pause = pause

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.pause:
            transport.pause_reading()
        self.got.put_nowait(transport)


@asynccontextmanager
async def _tls_pair(pki: Path) -> AsyncIterator[tuple[asyncio.Transport, asyncio.Transport]]:
    """Both ends of a mutual-TLS TCP connection: (the client's, the server's)."""
    init_pki(pki)
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    server = await loop.create_server(
        lambda: _Held(accepted), "127.0.0.1", 0, ssl=server_ssl_context(pki)
    )
    port = server.sockets[0].getsockname()[1]
    client_q: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    await loop.create_connection(
        # paused only once the server has it: asyncio's TLS sends the client's last
        # handshake message as it reads on (as the pipe's client does, reading the 101)
        lambda: _Held(client_q, pause=False),
        "127.0.0.1",
        port,
        ssl=client_ssl_context(pki),
        server_hostname="127.0.0.1",
    )
    try:
        client, server_end = await client_q.get(), await accepted.get()
        client.pause_reading()
        yield client, server_end
    finally:
        server.close()


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while data := await loop.sock_recv(sock, 1 << 16):
        out += data
    return bytes(out)


def _qemu_pair() -> tuple[socket.socket, socket.socket]:
    """(QEMU's end, the daemon's end)."""
    qemu, mine = socket.socketpair()
    qemu.setblocking(False)
    return qemu, mine


async def test_tls_relay_both_ways_in_order_with_what_came_before(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with _tls_pair(tmp_path / "pki") as (client, server):
        # sent through the loop's TLS before either side hands over (as the bytes that
        # follow a request): the server's loop keeps them in its TLS buffer; not lost
        before = os.urandom(3000)
        client.write(before)
        await asyncio.sleep(0.3)  # the server's loop reads it into its TLS buffers
        src_qemu, src_mine = _qemu_pair()
        dst_qemu, dst_mine = _qemu_pair()
        up = os.urandom(5 * (1 << 20) + 4321)  # the source QEMU's stream
        down = os.urandom(900_001)  # the destination QEMU's answers (return path, NBD)
        relays = asyncio.gather(
            tunnel.splice(src_mine, client),
            tunnel.splice(dst_mine, server, early=b"early"),
        )

        async def source() -> bytes:
            await loop.sock_sendall(src_qemu, up)
            answers = bytearray()
            while len(answers) < len(down):
                answers += await loop.sock_recv(src_qemu, 1 << 16)
            src_qemu.shutdown(socket.SHUT_WR)  # the end of the stream
            return bytes(answers) + await _read_all(src_qemu)

        async def destination() -> bytes:
            await loop.sock_sendall(dst_qemu, down)
            # it never closes: TLS has no half-close, the source's end ends the tunnel
            return await _read_all(dst_qemu)

        at_src, at_dst = await asyncio.wait_for(asyncio.gather(source(), destination()), 60)
        await asyncio.wait_for(relays, 30)
        assert at_dst == b"early" + before + up
        assert at_src == down
        for s in (src_qemu, dst_qemu):
            s.close()


async def test_tls_relay_cancelled_lets_go_of_both_connections(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with _tls_pair(tmp_path / "pki") as (client, server):
        src_qemu, src_mine = _qemu_pair()
        dst_qemu, dst_mine = _qemu_pair()
        src = asyncio.create_task(tunnel.splice(src_mine, client))
        dst = asyncio.create_task(tunnel.splice(dst_mine, server))
        await loop.sock_sendall(src_qemu, b"x" * 1000)
        assert await asyncio.wait_for(loop.sock_recv(dst_qemu, 1000), 30)
        src.cancel()  # an aborted migration
        # the source's QEMU end is shut; the destination sees its stream end
        assert await asyncio.wait_for(_read_all(src_qemu), 30) == b""
        await asyncio.wait_for(_read_all(dst_qemu), 30)
        await asyncio.wait_for(dst, 30)
        assert src.cancelled()
        for s in (src_qemu, dst_qemu):
            s.close()
