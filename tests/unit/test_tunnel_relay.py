"""The tunnel's splice: bytes arrive in order both ways; a stalled reader stops the writer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from vmferry.migration import tunnel

Splice = Callable[[socket.socket, asyncio.Transport, bytes], Awaitable[None]]


async def _peer_transport() -> tuple[asyncio.Transport, socket.socket]:
    """A transport (as a daemon's upgraded connection) and the far end's plain socket."""
    near, far = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock=near)
    transport.pause_reading()  # as a hijacked connection comes
    assert isinstance(transport, asyncio.Transport)
    return transport, far


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while data := await loop.sock_recv(sock, 1 << 16):
        out += data
    return bytes(out)


# the relay threads (a detached connection) and the event-loop relay (any other transport)
@pytest.mark.parametrize("relay_with", [tunnel.splice, tunnel._splice_on_loop])
async def test_splice_relays_both_ways_in_order_then_ends(relay_with: Splice) -> None:
    loop = asyncio.get_running_loop()
    qemu, mine = socket.socketpair()
    peer, far = await _peer_transport()
    for s in (qemu, far):
        s.setblocking(False)
    up = os.urandom(3 * (1 << 20) + 12345)  # QEMU to the peer
    down = os.urandom(700_001)  # the peer to QEMU (an NBD server's answers, say)
    relay = asyncio.create_task(relay_with(mine, peer, b"early"))

    async def qemu_side() -> bytes:
        await loop.sock_sendall(qemu, up)
        qemu.shutdown(socket.SHUT_WR)
        return await _read_all(qemu)

    async def far_side() -> bytes:
        await loop.sock_sendall(far, down)
        far.shutdown(socket.SHUT_WR)
        return await _read_all(far)

    at_qemu, at_far = await asyncio.gather(qemu_side(), far_side())
    await asyncio.wait_for(relay, 30)
    assert at_far == up
    assert at_qemu == b"early" + down
    qemu.close()
    far.close()


async def test_splice_stops_reading_when_qemu_stops_taking() -> None:
    loop = asyncio.get_running_loop()
    qemu, mine = socket.socketpair()
    tunnel.widen(qemu)
    peer, far = await _peer_transport()
    far.setblocking(False)
    relay = asyncio.create_task(tunnel.splice(mine, peer))
    block = bytes(1 << 20)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            await loop.sock_sendall(far, block)
            sent += len(block)

    pusher = asyncio.create_task(flood())
    # QEMU reads nothing: the pusher must stall, once socket buffers and the daemon's
    # WINDOW are full, instead of the daemon buffering everything
    bound = 8 * tunnel.WINDOW + 16 * len(block)
    last, still = -1, 0
    while still < 5:
        await asyncio.sleep(0.2)
        assert sent < bound, sent
        still = still + 1 if sent == last else 0
        last = sent
    pusher.cancel()
    relay.cancel()
    for s in (qemu, far):
        s.close()
