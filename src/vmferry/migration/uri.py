"""Which addresses a client may make this daemon (or its QEMU) reach during a migration.

libvirt restricts migration URIs to network schemes; vmferry accepts only
``tcp:HOST:PORT`` (``tcp://HOST:PORT`` is read the same way, IPv6 in brackets)
for the stream, never ``exec:``, ``file:``, ``unix:``, ``fd:`` or ``rdma:``
from a client, and checks every host against the administrator's
``[migration] allowed_networks``. A host name is resolved here and QEMU is
given the checked IP literal, so a second DNS answer cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass

from vmferry.errors import ErrorCode, VmferryError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Longest URI or address accepted from a client (a host name is at most 253 bytes).
MAX_URI_LEN = 300
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def invalid_value(what: str, value: object, why: str) -> VmferryError:
    """``INVALID_ARG``: *value* given as *what* is refused because *why*."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "...'"
    return VmferryError(ErrorCode.INVALID_ARG, f"invalid {what} {shown}: {why}")


@dataclass(frozen=True)
class TcpUri:
    """A checked ``tcp:HOST:PORT`` migration URI."""

    host: str  # an IP literal (no brackets) or a host name
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def ip_literal(text: str) -> IPAddress | None:
    """*text* as an IP address, or None when it is not one (scoped addresses are not)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_host(host: object, what: str = "host") -> str:
    """An IP literal or a host name, as given (no brackets); anything else is refused."""
    if not isinstance(host, str) or not host or len(host) > 253:
        raise invalid_value(what, host, "expected an IP address or a host name")
    if ip_literal(host) is not None or _HOSTNAME.fullmatch(host):
        return host
    raise invalid_value(what, host, "expected an IP address or a host name")


def parse_port(text: str, what: str, value: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise invalid_value(what, value, "the port must be a number from 1 to 65535")
    return int(text)


def parse_migration_uri(uri: object, what: str = "migration URI") -> TcpUri:
    """
    Parse the URI a migration stream is sent to (Perform's ``uri``, ``migrate_uri``).

    :raise VmferryError: ``INVALID_ARG`` naming the scheme for anything but
        ``tcp:HOST:PORT``: QEMU would run ``exec:`` commands, write ``file:``
        paths, or connect to ``unix:`` sockets as the daemon's user.
    """
    if not isinstance(uri, str) or not uri:
        raise invalid_value(what, uri, "expected tcp:HOST:PORT")
    if len(uri) > MAX_URI_LEN:
        raise invalid_value(what, uri, f"longer than {MAX_URI_LEN} characters")
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise invalid_value(what, uri, "expected tcp:HOST:PORT")
    if scheme.lower() != "tcp":
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"migration URI scheme '{scheme[:20]}' is not allowed: only tcp:HOST:PORT "
            "(network migration) can be requested",
        )
    rest = rest.removeprefix("//")
    if rest.endswith("/"):
        rest = rest[:-1]  # tcp://host:port/ as URIs are often written
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        v6 = isinstance(ip_literal(host), ipaddress.IPv6Address)
        if not close or not tail.startswith(":") or not v6:
            raise invalid_value(what, uri, "expected tcp:[IPv6]:PORT")
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise invalid_value(what, uri, "a port is required: tcp:HOST:PORT")
        if ":" in host:
            raise invalid_value(what, uri, "an IPv6 address goes in brackets: tcp:[IPv6]:PORT")
    port = parse_port(port_text, what, uri)
    return TcpUri(check_host(host, what), port)


def parse_networks(values: list[str]) -> list[IPNetwork]:
    """The ``allowed_networks`` CIDRs (a bare address is a single-host network)."""
    nets = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"'{value}' is not an IP network: {exc}"
            ) from None
    return nets


def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def address_allowed(addr: IPAddress, networks: list[IPNetwork]) -> bool:
    addr = _unmapped(addr)
    return any(addr.version == net.version and addr in net for net in networks)


async def resolve_allowed(host: str, networks: list[IPNetwork], what: str) -> str:
    """
    The IP literal to use for *host*, once every address it names is allowed.

    :raise VmferryError: ``INVALID_ARG`` if *host* does not resolve or any of
        its addresses lies outside *networks*.
    """
    literal = ip_literal(host)
    if literal is not None:
        addrs = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"cannot resolve {what} host '{host}': {exc}"
            ) from None
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addrs:
            raise VmferryError(ErrorCode.INVALID_ARG, f"{what} host '{host}' has no address")
    denied = [a for a in addrs if not address_allowed(a, networks)]
    if denied:
        allowed = ", ".join(str(n) for n in networks) or "none"
        raise VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"{what} host '{host}' ({denied[0]}) is not in the networks this host may migrate "
            f"to ([migration] allowed_networks: {allowed})",
        )
    return str(addrs[0])


async def checked_stream_uri(uri: object, networks: list[IPNetwork]) -> str:
    """Perform's *uri* checked and rewritten to ``tcp:IP:PORT`` for QEMU."""
    parsed = parse_migration_uri(uri)
    address = await resolve_allowed(parsed.host, networks, "migration URI")
    return str(TcpUri(address, parsed.port))
