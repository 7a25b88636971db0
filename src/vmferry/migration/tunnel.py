"""Tunnelled migration: the stream travels inside the daemons' own mutual-TLS connection.

libvirt's ``VIR_MIGRATE_TUNNELLED``, peer-to-peer only. No migration port is
opened on the destination; each QEMU gets one end of a socket pair from its
daemon instead (QMP ``getfd``, then ``migrate fd:NAME`` on the source and
``migrate-incoming fd:NAME`` on the destination, which waits with
``-incoming defer``).

The source daemon opens a connection of its own to the destination daemon's
listener (the p2p peer connection's TLS client certificate and checks) and
asks ``POST /v1/domains/NAME/migrate/tunnel?session=ID`` with
``Upgrade: vmferry-tunnel``: the permission of Prepare, and the session that
prepared the incoming domain, so nobody else can attach. After the
``101 Switching Protocols`` both daemons :func:`splice` that connection and
their QEMU's end of the socket pair: raw bytes, both directions, no HTTP
framing in between.

The relay runs in two threads per tunnel, off the event loop (:class:`_Relay`
on the connection :func:`~vmferry.migration.wire.detach` took from asyncio):
asyncio's TLS cost a Python callback and several copies per read on the one
loop thread. Memory stays bounded: a thread reads its next chunk only once the
last one was written, so a slow QEMU or a slow link slows the other end down
instead of filling the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable

from vmferry.migration.wire import CHUNK, PLAIN_ROOM, Wire, detach
from vmferry.qemu.monitor import Monitor

#: The QMP name of the descriptor each QEMU gets.
FD_NAME = "vmferry-tunnel"
#: QMP names of the NBD descriptors: the destination's listener; the source's, plus the disk.
NBD_FD_PREFIX = "vmferry-nbd-"
#: The tunnels a migration has: its stream, and one per NBD connection (storage).
MIGRATION_STREAM = ""
NBD_STREAM = "nbd"
STREAMS = frozenset({MIGRATION_STREAM, NBD_STREAM})
#: The ``Upgrade`` token of the tunnel route.
UPGRADE = "vmferry-tunnel"
#: Kernel and transport buffering per stream end: large enough that QEMU and the peer
#: keep moving while a daemon waits for the CPU (a busy host wakes it late), small
#: enough to bound what is in flight.
WINDOW = 4 << 20

#: Connects the daemon's end of QEMU's socket pair to the peer daemon and relays
#: both ways until the stream ends (the source's side of the tunnel).
#: Its second argument names the stream (:data:`MIGRATION_STREAM`, :data:`NBD_STREAM`).
Sender = Callable[[socket.socket, str], Awaitable[None]]


async def give_qemu_end(mon: Monitor, name: str = FD_NAME) -> socket.socket:
    """A socket pair; QEMU gets one end as *name*, the daemon keeps the other."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (mine, theirs):
        widen(sock)
    try:
        await mon.execute_with_fd("getfd", {"fdname": name}, theirs.fileno())
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine


#: Takes over the connection of the tunnel request once it is accepted: its transport
#: (reading paused, the ``101`` sent) and the bytes that came after the request.
Hijack = Callable[[], tuple[asyncio.Transport, bytes]]


def widen(sock: socket.socket) -> None:
    """Socket buffers of :data:`WINDOW` (root may exceed net.core.[rw]mem_max: *FORCE)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, WINDOW)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, WINDOW)


class _End(asyncio.Protocol):
    """One side of a splice: what it receives is written to the other side."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _End | None = None
        self.eof = False
        self.error: Exception | None = None
        self._done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WINDOW)

    def data_received(self, data: bytes) -> None:
        assert self.other is not None and self.other.transport is not None
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        assert self.other is not None and self.other.transport is not None
        self.eof = True
        out = self.other.transport
        if self.other.eof:
            out.close()
        elif out.can_write_eof():
            out.write_eof()  # the other direction may go on
        else:
            out.close()  # TLS has no half-close: flushes, then close_notify
        return True

    # our writes are buffered past WINDOW: stop reading the other side until they drain
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()  # after flushing what it buffered
        self.error = exc
        if not self._done.done():
            self._done.set_result(None)


def _widen_peer(peer: asyncio.Transport) -> None:
    """Room for :data:`WINDOW` on the peer's side too: kernel buffers and TLS reading."""
    raw = peer.get_extra_info("socket")
    if raw is not None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, option, WINDOW)
    set_read_limits = getattr(peer, "set_read_buffer_limits", None)  # TLS transports only
    if set_read_limits is not None:
        set_read_limits(high=WINDOW)


async def splice(qemu: socket.socket, peer: asyncio.Transport, early: bytes = b"") -> None:
    """
    Relay between QEMU's socket-pair end *qemu* and the connection to the peer
    daemon *peer* (an upgraded one), both ways, until both are closed.

    The relay runs in threads of its own (:class:`_Relay`, on a :class:`Wire` that
    :func:`detach` took from the event loop); a transport it cannot take is relayed on
    the event loop as before. Cancelling stops the relay at once (both connections shut).

    :param early: Bytes of the peer that arrived with the upgrade, for QEMU first.
    """
    try:
        wire = await detach(peer)
    except BaseException:
        qemu.close()
        peer.close()
        raise
    if wire is None:
        await _splice_on_loop(qemu, peer, early)
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # room for WINDOW on the link too
        with contextlib.suppress(OSError):
            wire.sock.setsockopt(socket.SOL_SOCKET, option, WINDOW)
    loop = asyncio.get_running_loop()
    relay = _Relay(qemu, wire, early)
    finished: asyncio.Future[None] = loop.create_future()
    threading.Thread(
        target=relay.run, args=(loop, finished), name="vmferry-tunnel", daemon=True
    ).start()
    try:
        await finished
    except BaseException:
        relay.stop()  # the threads end and close both sockets
        raise
    if relay.error is not None:
        raise relay.error


class _Relay:
    """
    QEMU's socket-pair end and the peer's :class:`Wire`, relayed by two blocking threads
    (one per direction) in chunks of :data:`CHUNK`.

    Each direction ends at its reader's end (QEMU's EOF, the peer's close_notify or FIN)
    and passes it on; both sockets are closed once both directions ended. Memory stays
    bounded: a reader waits while its writer is blocked (a slow QEMU or link), so one
    tunnel holds a few chunks beyond the kernel buffers of :data:`WINDOW`. The first
    error stops both directions and is the relay's.
    """

    def __init__(self, qemu: socket.socket, wire: Wire, early: bytes) -> None:
        qemu.setblocking(True)
        self.qemu, self.wire, self.early = qemu, wire, early
        self.error: BaseException | None = None
        self._stopped = False
        self._qemu_closed = False  # QEMU closed its end: what the peer sends is for nobody

    def run(self, loop: asyncio.AbstractEventLoop, finished: asyncio.Future[None]) -> None:
        up = threading.Thread(target=self._guarded, args=(self._up,), name="vmferry-tunnel-up")
        up.start()
        self._guarded(self._down)
        up.join()
        self.qemu.close()
        self.wire.sock.close()
        with contextlib.suppress(RuntimeError):  # the loop is gone (daemon shut down)
            loop.call_soon_threadsafe(_settle, finished)

    def stop(self) -> None:
        self._stopped = True
        self.wire.stop()
        with contextlib.suppress(OSError):
            self.qemu.shutdown(socket.SHUT_RDWR)

    def _guarded(self, direction: Callable[[], None]) -> None:
        try:
            direction()
        except Exception as exc:
            if self.error is None and not self._stopped:
                self.error = exc
            self.stop()

    def _up(self) -> None:
        """QEMU to the peer."""
        buf = memoryview(bytearray(CHUNK))
        self.wire.flush()
        while n := self.qemu.recv_into(buf):
            self.wire.sendall(buf[:n])
        self._qemu_closed = True
        self.wire.close_write()

    def _down(self) -> None:
        """The peer to QEMU."""
        if self.early:
            self._to_qemu(memoryview(self.early))
        buf = memoryview(bytearray(PLAIN_ROOM))
        while n := self.wire.recv_into(buf):
            self._to_qemu(buf[:n])
        with contextlib.suppress(OSError):
            self.qemu.shutdown(socket.SHUT_WR)
        if self.wire.is_tls:
            # TLS has no half-close: the peer's close_notify ends both directions (our
            # close_notify answers it; what QEMU still sends is dropped, as asyncio did)
            with contextlib.suppress(OSError):  # a courtesy: the peer may be gone already
                self.wire.close_write()
            with contextlib.suppress(OSError):
                self.qemu.shutdown(socket.SHUT_RD)  # wakes the other direction

    def _to_qemu(self, data: memoryview) -> None:
        try:
            self.qemu.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            if not self._qemu_closed:
                raise
            # QEMU is done with the stream: the peer's last words go nowhere, as before


def _settle(finished: asyncio.Future[None]) -> None:
    if not finished.done():
        finished.set_result(None)


async def _splice_on_loop(qemu: socket.socket, peer: asyncio.Transport, early: bytes = b"") -> None:
    """:func:`splice` on the event loop (asyncio protocols), for a transport not detached."""
    loop = asyncio.get_running_loop()
    lost: list[asyncio.Future[None]] = [loop.create_future(), loop.create_future()]
    near, far = _End(lost[0]), _End(lost[1])
    qemu.setblocking(False)
    try:
        await loop.connect_accepted_socket(lambda: near, sock=qemu)
    except BaseException:
        qemu.close()
        peer.close()
        raise
    near.other, far.other = far, near
    _widen_peer(peer)
    peer.set_protocol(far)
    far.connection_made(peer)
    if early:
        assert near.transport is not None
        near.transport.write(early)
    peer.resume_reading()
    try:
        await asyncio.gather(*lost)
    finally:
        for end in (near, far):
            if end.transport is not None:
                end.transport.close()
    for end in (far, near):
        if end.error is not None:
            raise end.error


async def relay_out(sock: socket.socket, send: Sender, stream: str = MIGRATION_STREAM) -> None:
    """Source: connect QEMU's end *sock* to the peer with *send*, until the stream ends."""
    try:
        await send(sock, stream)
    finally:
        sock.close()
