"""The caller of each connection, taken from the listener's transport.

uvicorn does not put the transport or the peer certificate into the ASGI
scope, so each listener gets its own HTTP protocol class
(:func:`protocol_class`): when a connection is made (after the TLS
handshake), it reads the peer's credentials (``SO_PEERCRED`` on a unix
socket, the verified client certificate on TLS), decides the role, and
puts the :class:`~vmferry.daemon.access.Caller` into the scope of every
request of that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from typing import Any

from cryptography import x509
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vmferry.daemon.access import (
    CALLER_KEY,
    AccessPolicy,
    Caller,
    Role,
    printable,
    refused_connection,
    run_audited,
)
from vmferry.migration.tunnel import UPGRADE

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)]
    out += [f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)]
    out += [f"email:{e}" for e in ext.get_values_for_type(x509.RFC822Name)]
    out += [f"URI:{u}" for u in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    return out


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return "?"


def identify(
    transport: asyncio.BaseTransport, kind: str, readonly: bool, policy: AccessPolicy
) -> Caller:
    """
    The :class:`Caller` on the other end of *transport*.

    :param kind: The listener's kind: ``unix``, ``tls`` or ``tcp``.
    :param readonly: The listener has ``?ro=1``: nobody on it is more than read-only.
    """
    cap = Role.READ_ONLY if readonly else Role.ADMIN
    if kind == "unix":
        sock: Any = transport.get_extra_info("socket")
        pid: int | None = None
        uid: int | None = None
        gid: int | None = None
        # The identity is for the record only: the socket mode decided who got in.
        with contextlib.suppress(OSError, struct.error, AttributeError):
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, gid = _UCRED.unpack(raw)
        # Whoever can open the socket gets the listener's role: the file mode is the check.
        return Caller(cap, "unix", uid=uid, gid=gid, pid=pid)
    if kind == "tls":
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # cannot happen with CERT_REQUIRED; refuse rather than guess
            return Caller(None, "tls", subject="(no certificate)", address=_address(transport))
        cert = x509.load_der_x509_certificate(der)
        subject = printable(cert.subject.rfc4514_string())
        role = policy.role_for_cert(subject, _sans(cert))
        if role is not None and readonly:
            role = Role.READ_ONLY
        return Caller(role, "tls", subject=subject, address=_address(transport))
    # Plain TCP (only with --insecure, on loopback): no authentication, as before.
    return Caller(cap, kind, address=_address(transport))


def with_caller(app: ASGIApp, caller: Caller, policy: AccessPolicy) -> ASGIApp:
    """
    *app*, seeing *caller* as the peer of every request: what each listener
    does per connection; in-process tests (an ASGI transport) use it too,
    since the daemon's app refuses requests without a caller.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[CALLER_KEY] = caller
            if caller.role is None:
                await run_audited(refused_connection(caller), policy, scope, receive, send)
                return
        await app(scope, receive, send)

    return wrapped


#: Scope extension of a request asking ``Upgrade: vmferry-tunnel``: a callable
#: that answers ``101`` and hands over the connection (see :func:`protocol_class`).
HIJACK_KEY = "vmferry.hijack"
#: The upgrade tokens a route may take the connection for.
UPGRADES = frozenset({UPGRADE.encode()})


def protocol_class(
    kind: str, readonly: bool, policy: AccessPolicy, base: type[H11Protocol] = H11Protocol
) -> type[H11Protocol]:
    """A uvicorn HTTP protocol (derived from *base*) that tags every request with its caller."""

    class CallerProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if transport.is_closing():  # refused by the base (max_clients)
                return
            caller = identify(transport, kind, readonly, policy)
            me: H11Protocol = self
            me.app = with_caller(me.app, caller, policy)

        def _should_upgrade(self) -> bool:
            # Our own upgrade: the request runs through the app (access check, audit,
            # the route's validation); the route then takes the connection (_hijack).
            me: Any = self
            upgrade = me._get_upgrade()
            if upgrade in UPGRADES:
                me.scope.setdefault("extensions", {})[HIJACK_KEY] = me._hijack
                return False
            return bool(super()._should_upgrade())

        def _hijack(self) -> tuple[asyncio.Transport, bytes]:
            me: Any = self
            cycle = me.cycle
            if cycle is None or cycle.response_started or me.transport.is_closing():
                raise ConnectionError("the connection cannot be taken over")
            cycle.disconnected = True  # whatever the app sends now goes nowhere
            me.connections.discard(self)  # no longer an HTTP client (max_clients, shutdown)
            if hasattr(me, "_disarm"):
                me._disarm()
            me._unset_keepalive_if_required()
            upgrade = me._get_upgrade()
            me.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                + upgrade
                + b"\r\n\r\n"
            )
            early, _closed = me.conn.trailing_data
            transport: asyncio.Transport = me.transport
            transport.pause_reading()
            return transport, bytes(early)

    return CallerProtocol
