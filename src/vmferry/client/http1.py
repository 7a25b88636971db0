"""HTTP/1.1 to vmferryd with the standard library only, blocking.

Why not httpx (which :class:`~vmferry.client.aio.AsyncClient` uses) or
``http.client``: importing either costs more than the whole ``vmferry list``
may take (issue 10).  The daemon speaks plain HTTP/1.1 (uvicorn), the
requests are small JSON documents and the answers JSON or NDJSON streams,
so a request is one connection (``Connection: close``): nothing to pool,
no stale keep-alive connection to retry on.  A unix socket is opened with the
C module ``_socket``: the ``socket`` module's import (its enums) is a tenth of
what ``vmferry migrate`` spends before its first request; ``tcp://`` and
``tls://`` load it (and ``ssl``) when they connect.

Failures become :class:`VmferryError`: ``CONNECT_FAILED`` while connecting
(nothing was sent), ``RPC_FAILED`` once the request may have reached the
daemon.
"""

from __future__ import annotations

import _socket
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    import ssl

    from vmferry.client.transport import Endpoint

#: A connection: ``_socket.socket`` (unix), or its subclasses ``socket.socket`` (tcp) and
#: ``ssl.SSLSocket`` (tls).
Socket = _socket.socket
T = TypeVar("T")

#: Connecting never needs long; a dead host should fail fast.
CONNECT_TIMEOUT = 15.0
#: A status line or header longer than this is not from vmferryd.
MAX_LINE = 65536
MAX_HEADERS = 100


class Answer:
    """A complete answer: status and body."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def encode_request(
    endpoint: Endpoint,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> bytes:
    """
    The bytes of one request's head (and body); *body* is sent as JSON unless it
    is ``None``; *chunked*: the body follows in chunks (:func:`sync_request`'s *body*).
    """
    if params:
        from vmferry.client.calls import quote

        path += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in params.items())
    target = path
    if endpoint.scheme == "unix":
        host = "vmferry"
    else:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        host = f"{host}:{endpoint.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    data = b""
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif body is not None:
        data = json.dumps(body, separators=(",", ":")).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    elif method in ("POST", "PUT", "PATCH", "DELETE"):
        lines.append("Content-Length: 0")
    for key, value in (headers or {}).items():
        if any(c in key + value for c in "\r\n"):
            raise VmferryError(ErrorCode.INVALID_ARG, f"invalid header {key!r}")
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class _Head:
    """Status and the headers that decide how the body is framed."""

    def __init__(self) -> None:
        self.status = 0
        self.length: int | None = None
        self.chunked = False

    def status_line(self, line: bytes) -> None:
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {line[:80]!r}")
        self.status = int(parts[1])

    def header(self, line: bytes) -> None:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"bad header line {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise ValueError(f"bad Content-Length {value[:20]!r}")
            self.length = int(value)
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise ValueError(f"bad chunk size {line[:20]!r}") from None


def _split_lines(pieces: Iterator[bytes]) -> Iterator[str]:
    """Lines (without their end) of a body read in *pieces*."""
    pending = b""
    for piece in pieces:
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")


# -- errors ----------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    # What a user recognises: the OS's words, or the TLS library's reason.
    ssl = sys.modules.get("ssl")  # loaded whenever an SSLError can occur
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):  # socket.timeout too (the same class)
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def connect_error(endpoint: Endpoint, exc: BaseException) -> VmferryError:
    return VmferryError(
        ErrorCode.CONNECT_FAILED, f"cannot connect to vmferryd at {endpoint.uri}: {_reason(exc)}"
    )


def exchange_error(endpoint: Endpoint, exc: BaseException) -> VmferryError:
    """The request was (maybe) sent: its outcome is unknown."""
    if isinstance(exc, TimeoutError):
        return VmferryError(
            ErrorCode.RPC_FAILED,
            f"no answer from vmferryd at {endpoint.uri} in time (timed out); "
            "the operation may still complete: check the domain's state",
        )
    return VmferryError(
        ErrorCode.RPC_FAILED, f"lost connection to vmferryd at {endpoint.uri}: {_reason(exc)}"
    )


# -- blocking --------------------------------------------------------------------------------


class _Reader(io.RawIOBase):
    """A socket's receiving side as a raw stream (``socket.makefile("rb")``'s, for ``_socket``)."""

    def __init__(self, sock: Socket) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)


def _reader(sock: Socket) -> io.BufferedReader:
    return io.BufferedReader(_Reader(sock))


class SyncStream:
    """An answer whose body is read as it arrives (``iter_lines``); close it when done."""

    def __init__(self, endpoint: Endpoint, sock: Socket, head: _Head, file: Any) -> None:
        self._endpoint = endpoint
        self._sock = sock
        self._file = file
        self._head = head
        self.status = head.status
        self.closed = False

    def _pieces(self) -> Iterator[bytes]:
        f, head = self._file, self._head
        if head.chunked:
            while True:
                size = _chunk_size(self._readline())
                if size == 0:
                    return
                data = f.read(size + 2)
                if len(data) < size + 2:
                    raise ConnectionError("connection closed inside a chunk")
                yield data[:size]
        elif head.length is not None:
            left = head.length
            while left > 0:
                data = f.read1(min(left, 65536))
                if not data:
                    raise ConnectionError("connection closed inside the answer")
                left -= len(data)
                yield data
        else:
            while data := f.read1(65536):
                yield data

    def _readline(self) -> bytes:
        line: bytes = self._file.readline(MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed" if not line else "line too long")
        return line

    def _guard(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from pieces
        except (OSError, ValueError) as exc:
            if self.closed:
                return  # closed by us (maybe from another thread): the end
            raise exchange_error(self._endpoint, exc) from exc

    def read(self) -> bytes:
        """The whole body."""
        return b"".join(self._guard(self._pieces()))

    def iter_bytes(self) -> Iterator[bytes]:
        """The body's pieces as they arrive; ends with the body."""
        return self._guard(self._pieces())

    def iter_lines(self) -> Iterator[str]:
        """The body's lines as they arrive; ends with the body."""
        return _split_lines(self._guard(self._pieces()))

    def close(self) -> None:
        self.closed = True
        # shutdown() first: it wakes a reader blocked in another thread.
        try:
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self._file.close()
        self._sock.close()


def _open_socket(
    endpoint: Endpoint, ssl_context: ssl.SSLContext | None, timeout: float | None
) -> Socket:
    connect_timeout = CONNECT_TIMEOUT if timeout is None else min(timeout, CONNECT_TIMEOUT)
    sock: Socket
    try:
        if endpoint.scheme == "unix":
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(connect_timeout)
            try:
                sock.connect(endpoint.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            import socket

            sock = socket.create_connection((endpoint.host, endpoint.port), connect_timeout)
            if ssl_context is not None:
                try:
                    sock = ssl_context.wrap_socket(sock, server_hostname=endpoint.host)
                except BaseException:
                    sock.close()
                    raise
    except OSError as exc:
        raise connect_error(endpoint, exc) from exc
    sock.settimeout(timeout)
    return sock


def sync_request(
    endpoint: Endpoint,
    ssl_context: ssl.SSLContext | None,
    request: bytes,
    timeout: float | None,
    *,
    stream: bool = False,
    body: Iterable[bytes] | None = None,
) -> SyncStream:
    """
    Send *request* and read the answer's head; the caller reads the body and closes.

    :param body: The body's pieces, sent chunked after *request* (a head
        encoded with ``chunked=True``), e.g. a volume's upload.
    """
    return send_request(endpoint, ssl_context, request, timeout, body=body).answer()


def send_request(
    endpoint: Endpoint,
    ssl_context: ssl.SSLContext | None,
    request: bytes,
    timeout: float | None,
    *,
    body: Iterable[bytes] | None = None,
) -> Sent:
    """
    Send *request* (and *body*, as :func:`sync_request`) without waiting for the answer:
    requests to several daemons can so be in flight at once.
    """
    sock = _open_socket(endpoint, ssl_context, timeout)
    file = _reader(sock)

    def send() -> None:
        sock.sendall(request)
        if body is not None:
            _send_chunks(sock, body)

    _closing_on_error(endpoint, sock, file, send)
    return Sent(endpoint, sock, file)


class Sent:
    """A request sent, its answer not read yet: :meth:`answer` reads its head, or :meth:`close`."""

    def __init__(self, endpoint: Endpoint, sock: Socket, file: io.BufferedReader) -> None:
        self._endpoint, self._sock, self._file = endpoint, sock, file

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def answer(self) -> SyncStream:
        """The answer once its head is in; the caller reads the body and closes it."""
        return _read_head(self._endpoint, self._sock, self._file)


def _read_head(endpoint: Endpoint, sock: Socket, file: io.BufferedReader) -> SyncStream:
    def read() -> SyncStream:
        head = _Head()
        answer = SyncStream(endpoint, sock, head, file)
        head.status_line(answer._readline())
        for _ in range(MAX_HEADERS):
            line = answer._readline()
            if line in (b"\r\n", b"\n"):
                break
            head.header(line)
        else:
            raise ValueError("too many headers")
        answer.status = head.status
        return answer

    return _closing_on_error(endpoint, sock, file, read)


def _closing_on_error(
    endpoint: Endpoint, sock: Socket, file: io.BufferedReader, step: Callable[[], T]
) -> T:
    """*step*'s result; on a failure the connection is closed (I/O errors: ``exchange_error``)."""
    try:
        return step()
    except (OSError, ValueError) as exc:
        file.close()
        sock.close()
        raise exchange_error(endpoint, exc) from exc
    except BaseException:
        file.close()
        sock.close()
        raise


def _send_chunks(sock: Socket, body: Iterable[bytes]) -> None:
    try:
        for data in body:
            if data:
                sock.sendall(b"%x\r\n%b\r\n" % (len(data), data))
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        # The daemon answered (an error) without reading all of it: read that answer.
        pass


def sync_exchange(
    endpoint: Endpoint, ssl_context: ssl.SSLContext | None, request: bytes, timeout: float | None
) -> Answer:
    """Send *request*; its complete answer."""
    answer = sync_request(endpoint, ssl_context, request, timeout)
    try:
        return Answer(answer.status, answer.read())
    finally:
        answer.close()
