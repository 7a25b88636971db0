"""The peer connection of a tunnel, taken off the event loop: blocking calls for relay threads.

asyncio's TLS (``sslproto``) costs a Python callback and several copies per read of at
most 256 KiB on each daemon, all on the one event-loop thread that also serves the API;
that capped the tunnel at a third of a direct migration (docs/migration-tls.md).  After
the ``Upgrade`` the connection is only bytes both ways, so :func:`detach` takes it from
its transport: a duplicate of the socket's descriptor, and the TLS session as it is (the
``SSLObject`` with its two memory BIOs: nothing read or written is lost, the handshake
and the peer's checked certificate stay).  :class:`Wire` then reads and writes it with
blocking calls from relay threads; OpenSSL and the socket calls release the GIL, so the
crypto runs beside the event loop, in chunks of :data:`CHUNK`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from typing import Any, cast

#: Bytes per read or write: large enough that the per-call Python work is negligible,
#: small enough to bound what one tunnel holds (a few chunks, plus kernel buffers).
CHUNK = 256 << 10
#: Room for what one chunk of ciphertext decrypts to, plus a record held back from the
#: previous one (at most 16 KiB of plaintext per TLS record).
PLAIN_ROOM = CHUNK + (64 << 10)
#: How long the ``101`` (or an earlier write) may take to leave before the hand-over.
FLUSH_TIMEOUT = 30.0


class Wire:
    """
    The peer daemon's end of a tunnel: blocking ``recv_into``/``sendall`` of plaintext.

    One thread reads and another writes at the same time. A TLS session is one OpenSSL
    object: every call on it holds ``_ssl_lock``; ciphertext leaves in the order it was
    made because taking it from the BIO and sending it happen under ``_send_lock``.
    """

    def __init__(
        self, sock: socket.socket, tls: tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None
    ) -> None:
        self.sock = sock
        self._tls = tls
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._cipher = bytearray(CHUNK) if tls is not None else bytearray()
        self._closed_write = False

    def recv_into(self, buf: memoryview) -> int:
        """Plaintext into *buf* (at least :data:`CHUNK` bytes for TLS); 0 at the end."""
        if self._tls is None:
            return self.sock.recv_into(buf)
        assert len(buf) >= PLAIN_ROOM
        view = memoryview(self._cipher)
        feed: memoryview | None = None
        while True:
            got, ended = self._decrypt(buf, feed)
            if got or ended:
                return got
            n = self.sock.recv_into(view)
            if not n:
                return 0  # the connection ended without close_notify: an end all the same
            feed = view[:n]

    def _decrypt(self, buf: memoryview, feed: memoryview | None) -> tuple[int, bool]:
        """*feed* into the incoming BIO, every complete record decrypted into *buf*."""
        assert self._tls is not None
        sslobj, incoming, _ = self._tls
        got, ended = 0, False
        with self._ssl_lock:
            if feed is not None:
                incoming.write(feed)
            # drained entirely (buf has room) before the lock is let go: a close_notify
            # sent by the other thread (OpenSSL reads while shutting down) drops no data
            while True:
                try:
                    n = cast(int, sslobj.read(len(buf) - got, buf[got:]))  # into buf: a count
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:  # the peer's close_notify
                    ended = True
                    break
                if not n:
                    ended = True
                    break
                got += n
            reply = self._tls[2].pending > 0
        if reply:  # post-handshake messages (session tickets, key updates)
            self._flush()
        return got, ended

    def sendall(self, data: memoryview) -> None:
        """All of *data* to the peer (blocks while the peer or the link is slower)."""
        if self._tls is None:
            self.sock.sendall(data)
            return
        sslobj, _, outgoing = self._tls
        with self._send_lock:
            if self._closed_write:
                return  # the tunnel is closing (the peer's end came): as the loop's TLS, dropped
            with self._ssl_lock:
                sslobj.write(data)  # all of it: the BIO takes any amount
                out = outgoing.read()
            self.sock.sendall(out)

    def _flush(self) -> None:
        assert self._tls is not None
        with self._send_lock:
            with self._ssl_lock:
                out = self._tls[2].read()
            if out:
                self.sock.sendall(out)

    def flush(self) -> None:
        """Send what the event loop's TLS had made but not sent yet."""
        if self._tls is not None:
            self._flush()

    def close_write(self) -> None:
        """The end of what this side sends: TLS close_notify, then the TCP FIN (once)."""
        with self._send_lock:
            if self._closed_write:
                return
            self._closed_write = True
            if self._tls is not None:
                with self._ssl_lock:
                    with contextlib.suppress(ssl.SSLError):  # wants the peer's: it comes later
                        self._tls[0].unwrap()
                    out = self._tls[2].read()
                self.sock.sendall(out)
            self.sock.shutdown(socket.SHUT_WR)

    @property
    def is_tls(self) -> bool:
        """TLS: no half-close (as asyncio's TLS, the peer's end closes the tunnel)."""
        return self._tls is not None

    def stop(self) -> None:
        """Wake up any thread blocked on the connection (it sees an end or an error)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


async def detach(peer: asyncio.Transport) -> Wire | None:
    """
    Take the connection of *peer* (reading paused, as a hijacked request or a pipe has
    it) from the event loop: a :class:`Wire` for blocking use, the transport aborted
    (which closes the loop's descriptor, not the duplicate). None if *peer* is not a
    socket transport of asyncio's own (then it stays as it was).
    """
    tls: Any = getattr(peer, "_ssl_protocol", None)
    raw: Any = peer if tls is None else getattr(tls, "_transport", None)
    sock: Any = raw.get_extra_info("socket") if raw is not None else None
    if sock is None or not hasattr(raw, "get_write_buffer_size"):
        return None
    if tls is not None and not all(
        isinstance(getattr(tls, a, None), t)
        for a, t in (("_sslobj", ssl.SSLObject), ("_incoming", ssl.MemoryBIO))
    ):
        return None
    # what was written (the 101, the request) leaves through the loop first
    async with asyncio.timeout(FLUSH_TIMEOUT):
        while raw.get_write_buffer_size() or (tls is not None and tls._write_backlog):
            if peer.is_closing():
                raise ConnectionError("the connection closed before the tunnel started")
            await asyncio.sleep(0.005)
    raw.pause_reading()  # from now on what arrives stays in the socket (or the BIO) for us
    mine = socket.socket(fileno=os.dup(sock.fileno()))
    mine.setblocking(True)
    session = None
    if tls is not None:
        session = (tls._sslobj, tls._incoming, tls._outgoing)
        # the aborted protocol empties its BIOs when the loop sees the end: give it others
        tls._incoming, tls._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer.abort()
    return Wire(mine, session)
