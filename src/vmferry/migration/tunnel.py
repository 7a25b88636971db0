"""Tunnelled migration: the stream travels inside the daemons' own mutual-TLS connection.

libvirt's ``VIR_MIGRATE_TUNNELLED``, peer-to-peer only. No migration port is
opened on the destination; each QEMU gets one end of a socket pair from its
daemon instead (QMP ``getfd``, then ``migrate fd:NAME`` on the source and
``migrate-incoming fd:NAME`` on the destination, which waits with
``-incoming defer``). The source daemon sends what its QEMU writes as the
streaming body of one request to the destination daemon
(``POST /v1/domains/NAME/migrate/tunnel``, over the p2p connection's TLS),
which writes it into its QEMU.

Memory stays bounded: each side reads at most :data:`CHUNK` bytes at a time
and hands them on before it reads again (the destination's ``sock_sendall``
returns once QEMU's end took them; uvicorn stops reading the connection while
the route has not consumed what came), so a slow QEMU or a slow link slows the
other end down instead of filling the daemon. Socket buffers of
:data:`WINDOW` let QEMU and the peer go on while a daemon waits for the CPU.

The tunnel carries one stream one way: no return path (so no
post-copy) and no multifd channels.

Storage migration can use the same route for its NBD connections: each is
one more stream, named by the request (``stream=`` is reserved for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from vmferry.qemu.monitor import Monitor

#: The QMP name of the descriptor each QEMU gets.
FD_NAME = "vmferry-tunnel"
#: The most either daemon reads at a time, per stream.
CHUNK = 1 << 20
#: Kernel and transport buffering per stream end: large enough that QEMU and the peer
#: keep moving while a daemon waits for the CPU (a busy host wakes it late), small
#: enough to bound what is in flight.
WINDOW = 4 << 20

#: Sends the chunks it is given to the peer daemon; returns once it took them all.
Sender = Callable[[AsyncIterator[bytes]], Awaitable[None]]


async def give_qemu_end(mon: Monitor) -> socket.socket:
    """A socket pair; QEMU gets one end as :data:`FD_NAME`, the daemon keeps the other."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (mine, theirs):
        widen(sock)
    try:
        await mon.execute_with_fd("getfd", {"fdname": FD_NAME}, theirs.fileno())
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine


def widen(sock: socket.socket) -> None:
    """Socket buffers of :data:`WINDOW` (root may exceed net.core.[rw]mem_max: *FORCE)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, WINDOW)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, WINDOW)


async def relay_out(sock: socket.socket, send: Sender) -> None:
    """Source: what QEMU writes into *sock* goes to the peer until QEMU closes its end."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    async def chunks() -> AsyncIterator[bytes]:
        # straight from the kernel into the chunk handed on: no stream buffer in between
        while data := await loop.sock_recv(sock, CHUNK):
            yield data

    try:
        await send(chunks())
    finally:
        sock.close()


async def relay_in(sock: socket.socket, chunks: AsyncIterator[bytes]) -> int:
    """Destination: the peer's bytes into QEMU's end; returns how many were relayed."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    total = 0
    try:
        async for data in chunks:
            await loop.sock_sendall(sock, data)  # returns once QEMU's end took it all
            total += len(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()
    return total
