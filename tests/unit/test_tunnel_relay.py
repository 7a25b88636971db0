"""The tunnel's relays: every byte arrives, in order, and a stalled reader stops the writer."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator

from vmferry.migration import tunnel


async def test_relay_out_hands_on_every_byte_then_ends() -> None:
    mine, qemu = socket.socketpair()
    data = os.urandom(3 * tunnel.CHUNK + 12345)
    got = bytearray()

    async def send(chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            assert len(chunk) <= tunnel.CHUNK
            got.extend(chunk)

    loop = asyncio.get_running_loop()
    writer = loop.run_in_executor(None, lambda: (qemu.sendall(data), qemu.close()))
    await tunnel.relay_out(mine, send)
    await writer
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_relay_in_delivers_in_order_and_closes() -> None:
    mine, qemu = socket.socketpair()
    parts = [os.urandom(n) for n in (1, 70_000, tunnel.CHUNK, 3)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    def read_all() -> bytes:
        out = bytearray()
        while data := qemu.recv(1 << 16):
            out.extend(data)
        return bytes(out)

    reader = asyncio.get_running_loop().run_in_executor(None, read_all)
    assert await tunnel.relay_in(mine, chunks()) == sum(map(len, parts))
    assert await reader == b"".join(parts)  # EOF came: the relay closed its end


async def test_relay_in_stops_taking_when_qemu_stops_reading() -> None:
    mine, qemu = socket.socketpair()
    tunnel.widen(qemu)
    tunnel.widen(mine)
    taken = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal taken
        block = bytes(tunnel.CHUNK)
        while True:
            taken += len(block)
            yield block

    task = asyncio.create_task(tunnel.relay_in(mine, endless()))
    for _ in range(200):  # plenty of turns for an unbounded relay to run away
        await asyncio.sleep(0.005)
    # what the kernel buffers of both ends hold, plus the chunk in hand
    bound = 4 * tunnel.WINDOW + 2 * tunnel.CHUNK
    assert 0 < taken <= bound, taken
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    qemu.close()
