"""The daemon's listeners: unix sockets and mutual-TLS TCP, served by uvicorn.

Listen URIs (``vmferryd --listen URI``, repeatable)::

    unix:///run/vmferry/vmferryd.sock   local clients; the socket is mode 0600
    tls://HOST:PORT                     remote clients, mutual TLS (see vmferry.pki)
    tcp://127.0.0.1:PORT                plain HTTP; only with --insecure and on loopback

IPv6 hosts are bracketed: ``tls://[::]:16514``.  Port 0 picks a free port.
``?ro=1`` makes a listener read-only: a unix socket of mode 0666 (or 0660
and ``[access] readonly_socket_group``) whose clients, like every client
of a ``tls://...?ro=1`` listener, have the read-only role
(see :mod:`vmferry.daemon.access`).

:func:`serve` runs one ``uvicorn.Server`` per listener in the running event
loop.  It binds the sockets itself, so errors surface as
:class:`VmferryError` rather than uvicorn's ``sys.exit``, installs no signal
handlers (the daemon owns SIGINT/SIGTERM) and runs no ASGI lifespan (the
servers share one app: the daemon sets its state up before :func:`serve` and
tears it down after).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import uvicorn
from starlette.types import ASGIApp

from vmferry import pki
from vmferry.daemon.access import AccessPolicy
from vmferry.daemon.config import LimitsConfig
from vmferry.daemon.conn import protocol_class as guarded_protocol
from vmferry.daemon.peer import protocol_class as caller_protocol
from vmferry.daemon.state import UNIX_PATH_MAX
from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

ListenKind = Literal["unix", "tls", "tcp"]

# Seconds a shutdown lets open requests finish before dropping their connections.
GRACEFUL_TIMEOUT = 3.0


@dataclass
class ListenSpec:
    """One listener: a unix socket *path*, or a TCP *host* and *port*."""

    kind: ListenKind
    path: Path | None = None
    host: str = ""
    port: int = 0
    readonly: bool = False  # ?ro=1: its clients are read-only

    def __str__(self) -> str:
        ro = "?ro=1" if self.readonly else ""
        if self.kind == "unix":
            return f"unix://{self.path}{ro}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}{ro}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen_uri(uri: str, *, insecure: bool) -> ListenSpec:
    """
    Parse a listen URI (see the module docstring).

    :param insecure: Allow ``tcp://`` (plain HTTP), on a loopback address only.
    :raise VmferryError: ``INVALID_ARG`` for anything else.
    """

    def bad(why: str) -> VmferryError:
        return VmferryError(ErrorCode.INVALID_ARG, f"invalid listen address {uri!r}: {why}")

    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.fragment or parts.query not in ("", "ro=1", "ro=0"):
        raise bad("the only query allowed is ?ro=1 (a read-only listener)")
    readonly = parts.query == "ro=1"

    if parts.scheme == "unix":
        if parts.netloc:
            raise bad("use unix:///absolute/path.sock (three slashes)")
        if not parts.path.startswith("/"):
            raise bad("the socket path must be absolute")
        if len(os.fsencode(parts.path)) > UNIX_PATH_MAX:
            raise bad(f"a unix socket path is at most {UNIX_PATH_MAX} bytes")
        return ListenSpec("unix", path=Path(parts.path), readonly=readonly)

    if parts.scheme not in ("tls", "tcp"):
        raise bad("use unix:///PATH, tls://HOST:PORT or tcp://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise bad("no user name allowed")
    if parts.path not in ("", "/"):
        raise bad("no path allowed after HOST:PORT")
    host = parts.hostname
    if not host:
        raise bad("a host is required, e.g. 0.0.0.0, [::] or 127.0.0.1")
    if port is None:
        raise bad("a port is required, e.g. tls://0.0.0.0:16514")
    if parts.scheme == "tcp":
        if not insecure or not _is_loopback(host):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"refusing plain TCP listener {uri!r}: it has no authentication or encryption; "
                "use tls://HOST:PORT, or --insecure with a loopback address "
                "(tcp://127.0.0.1:PORT) for testing",
            )
    kind: ListenKind = "tls" if parts.scheme == "tls" else "tcp"
    return ListenSpec(kind, host=host, port=port, readonly=readonly)


class _Server(uvicorn.Server):
    handshake_timeout: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would replace the daemon's SIGINT/SIGTERM handlers; the daemon sets `stop`.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's startup for given sockets, plus a TLS handshake timeout (asyncio's is 60 s).
        if sockets is None or self.handshake_timeout is None:
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        loop = asyncio.get_running_loop()
        self.servers = []
        for sock in sockets:
            server = await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self.handshake_timeout if config.ssl else None,
            )
            self.servers.append(server)
        self.started = True


def _fixed_context(
    ctx: ssl.SSLContext | None,
) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """An ``ssl_context_factory`` for uvicorn that hands out our mutual-TLS context."""
    assert ctx is not None

    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ctx

    return factory


def _is_socket(path: Path) -> bool:
    """Whether *path* is a socket; False if missing; an error if it is something else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"cannot listen on {path}: it exists and is not a socket"
        )
    return True


async def _check_unix_path(path: Path) -> None:
    """Remove a stale socket at *path*; refuse a live one or a non-socket."""
    if not _is_socket(path):
        return
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
    except (ConnectionRefusedError, FileNotFoundError):
        _remove(path)  # left behind by a daemon that died
        return
    except (TimeoutError, OSError) as exc:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED, f"cannot listen on {path}: socket in use? ({exc})"
        ) from exc
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise VmferryError(
        ErrorCode.OPERATION_FAILED,
        f"cannot listen on {path}: another vmferryd is running and listening there",
    )


def _remove(path: Path, inode: int | None = None) -> None:
    """Unlink *path*, if it is still the file with *inode* (when given)."""
    with contextlib.suppress(OSError):
        if inode is None or path.stat().st_ino == inode:
            path.unlink()


def _inode(path: Path) -> int:
    # Of the path: fstat() of the socket's fd would give the socket's own inode.
    return path.stat().st_ino


def readonly_socket_mode(spec: ListenSpec, policy: AccessPolicy) -> tuple[int, int]:
    """Mode and group of a unix socket: 0600; read-only ones 0666, or 0660 and a group."""
    if not spec.readonly:
        return 0o600, -1
    if not policy.readonly_socket_group:
        return 0o666, -1
    try:
        return 0o660, grp.getgrnam(policy.readonly_socket_group).gr_gid
    except KeyError:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"[access] readonly_socket_group: no group {policy.readonly_socket_group!r}",
        ) from None


def _bind_unix(path: Path, mode: int = 0o600, gid: int = -1) -> socket.socket:
    path.parent.mkdir(mode=0o700 if mode == 0o600 else 0o755, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from the start; a read-only one is opened up after.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


async def _bind(spec: ListenSpec, backlog: int, policy: AccessPolicy) -> socket.socket:
    if spec.kind == "unix":
        assert spec.path is not None
        await _check_unix_path(spec.path)
        sock = _bind_unix(spec.path, *readonly_socket_mode(spec, policy))
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _address(spec: ListenSpec, sock: socket.socket) -> str:
    # The URI a client connects to: without ?ro=1, which only the daemon reads.
    if spec.kind == "unix":
        return f"unix://{spec.path}"
    host, port = sock.getsockname()[:2]
    return str(ListenSpec(spec.kind, host=host, port=port))


async def _shutdown(
    servers: list[_Server], tasks: list[asyncio.Task[None]], graceful_timeout: float
) -> None:
    for server in servers:
        server.should_exit = True
    _, pending = await asyncio.wait(tasks, timeout=graceful_timeout)
    if pending:
        # Streaming responses never end by themselves; uvicorn would wait, then cancel them
        # with a traceback.  A closed connection is a clean client disconnect for them.
        for server in servers:
            for connection in list(server.server_state.connections):
                connection.transport.close()
        await asyncio.wait(pending)


async def serve(
    app: ASGIApp,
    specs: list[ListenSpec],
    *,
    pki_dir: Path | None,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    addresses: list[str] | None = None,
    access_log: bool = False,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    access: AccessPolicy | None = None,
    crl: Path | None = None,
    limits: LimitsConfig | None = None,
) -> None:
    """
    Serve *app* on every listener in *specs* until *stop* is set.

    :param pki_dir: The PKI directory; required if a listener is ``tls``.
    :param ready: Set once every listener accepts connections.
    :param addresses: If given, filled (before *ready*) with the URI each
        listener actually listens on, in the order of *specs* (real ports for port 0).
    :param access_log: Log every request (uvicorn's access log).
    :param graceful_timeout: Seconds to let open requests finish once
        *stop* is set; then their connections are closed, which handlers of
        long-lived responses (event streams) see as a client disconnect.
    :param access: Maps connections to roles (TLS allow-lists, read-only
        socket group); the defaults if None.
    :param crl: Revocation list for ``tls`` (default ``PKI_DIR/crl.pem`` if it exists).
    :param limits: ``max_clients``, ``handshake_timeout`` and ``idle_timeout``
        of every listener (see :mod:`vmferry.daemon.conn`); defaults if None.
    :raise VmferryError: ``INVALID_ARG`` without listeners or without a PKI
        for ``tls``; ``OPERATION_FAILED`` if a listener cannot be bound.
    """
    if not specs:
        raise VmferryError(ErrorCode.INVALID_ARG, "no listen address given")
    limits = limits or LimitsConfig()
    ssl_ctx: ssl.SSLContext | None = None
    if any(spec.kind == "tls" for spec in specs):
        if pki_dir is None:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                "a tls:// listener needs a PKI directory: set [tls] pki_dir or --pki-dir "
                "(create one with `vmferry pki init DIR`)",
            )
        ssl_ctx = pki.server_ssl_context(pki_dir, crl=crl)
    policy = access if access is not None else AccessPolicy()

    sockets: list[socket.socket] = []
    unix_paths: list[tuple[Path, int]] = []  # with the inode, to remove only our own socket
    servers: list[_Server] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for spec in specs:
            try:
                sock = await _bind(spec, backlog=128, policy=policy)
            except OSError as exc:
                raise VmferryError(
                    ErrorCode.OPERATION_FAILED,
                    f"cannot listen on {spec}: {exc.strerror or exc}",
                ) from exc
            sockets.append(sock)
            if spec.path is not None:
                unix_paths.append((spec.path, _inode(spec.path)))

        for spec, sock in zip(specs, sockets, strict=True):
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,  # keep the daemon's logging setup
                access_log=access_log,
                ws="none",
                proxy_headers=False,
                server_header=False,
                # A backstop only: _shutdown() closes lingering connections first.
                timeout_graceful_shutdown=int(graceful_timeout) + 5,
                ssl_context_factory=_fixed_context(ssl_ctx) if spec.kind == "tls" else None,
                http=caller_protocol(
                    spec.kind,
                    spec.readonly,
                    policy,
                    base=guarded_protocol(
                        max_clients=limits.max_clients, idle_timeout=limits.idle_timeout
                    ),
                ),
                timeout_keep_alive=math.ceil(limits.idle_timeout),
            )
            server = _Server(config)
            server.handshake_timeout = limits.handshake_timeout
            servers.append(server)
            tasks.append(asyncio.create_task(server.serve(sockets=[sock]), name=f"listen {spec}"))

        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.01)
        else:
            listening = [_address(spec, sock) for spec, sock in zip(specs, sockets, strict=True)]
            for spec, address in zip(specs, listening, strict=True):
                log.info("listening on %s%s", address, " (read-only)" if spec.readonly else "")
            if addresses is not None:
                addresses[:] = listening
            if ready is not None:
                ready.set()

        stop_task = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stop_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise VmferryError(
                    ErrorCode.INTERNAL_ERROR,
                    f"listener {task.get_name()} failed: {task.exception()}",
                )
            if task.done() and not stop.is_set():
                raise VmferryError(
                    ErrorCode.INTERNAL_ERROR, f"listener {task.get_name()} stopped unexpectedly"
                )
    finally:
        if tasks:
            # Even if we are being cancelled, let every server close its connections.
            await asyncio.shield(_shutdown(servers, tasks, graceful_timeout))
        for sock in sockets:
            sock.close()
        for path, inode in unix_paths:
            _remove(path, inode)
