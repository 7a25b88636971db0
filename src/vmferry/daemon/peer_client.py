"""This daemon's connections to other daemons, for the migration layer's p2p and peer probe.

The migration layer sits below the client library, so it names what it needs
(:class:`~vmferry.migration.host.PeerConnector`) and the daemon provides it
with an :class:`~vmferry.client.AsyncClient` (libvirt's p2p opens a remote
``virConnect`` the same way).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from vmferry.client import AsyncClient
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import RemoteDestination, open_session
from vmferry.client.pipe import open_pipe
from vmferry.client.transport import parse_uri
from vmferry.daemon.config import DaemonConfig
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.host import PeerConnection, PeerDomain, PeerHost
from vmferry.migration.protocol import DestinationSide
from vmferry.migration.tunnel import UPGRADE, splice
from vmferry.migration.uri import IPNetwork, check_host, invalid_value, resolve_allowed

#: Seconds to open the tunnel's connection when the client has no timeout.
PIPE_TIMEOUT = 30.0


class ClientPeer:
    """A :class:`~vmferry.migration.host.PeerConnection` over an :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient, pki_dir: Path | None = None) -> None:
        self._client = client
        self._pki_dir = pki_dir
        self._session = ""  # of destination(): the tunnel belongs to it

    @property
    def uri(self) -> str:
        """The peer daemon's URI."""
        return self._client.uri

    async def host(self, *, request_timeout: float | None = None) -> PeerHost:
        """The peer's host identity."""
        info = await self._client.host(request_timeout=request_timeout)
        return PeerHost(uuid=info.uuid, features=frozenset(info.features))

    async def dominfo(self, name: str) -> PeerDomain:
        """The peer's domain *name*."""
        info = await self._client.dominfo(name)
        return PeerDomain(uuid=info.uuid, state=info.state, async_job=info.job.async_job)

    async def tunnel(self, name: str, qemu: socket.socket, stream: str = "") -> None:
        """Splice *qemu* and a pipe to the peer's incoming *name*, until the stream ends."""
        call = mc.tunnel(name, self._session, stream)
        peer, early = await open_pipe(
            self._client.endpoint,
            self._pki_dir,
            call.path,
            call.headers or {},
            UPGRADE,
            timeout=self._client.timeout or PIPE_TIMEOUT,
        )
        await splice(qemu, peer, early)

    @contextlib.asynccontextmanager
    async def destination(self) -> AsyncIterator[DestinationSide]:
        """The peer as a migration destination, a session on it held meanwhile."""
        async with open_session(self._client) as session:
            self._session = session
            try:
                yield RemoteDestination(self._client, session)
            finally:
                self._session = ""


class ClientConnector:
    """Opens :class:`ClientPeer` connections with this daemon's TLS credentials."""

    def __init__(self, config: DaemonConfig) -> None:
        self._config = config

    @property
    def pki_dir(self) -> Path | None:
        return self._config.tls.pki_dir

    @contextlib.asynccontextmanager
    async def connect(self, uri: str, *, timeout: float) -> AsyncIterator[PeerConnection]:
        """A connection to the daemon at *uri*, every call bounded by *timeout* seconds."""
        async with AsyncClient(uri, pki_dir=self.pki_dir, timeout=timeout) as client:
            yield ClientPeer(client, self.pki_dir)


async def check_peer_uri(
    uri: object, networks: list[IPNetwork], *, insecure: bool, what: str = "destination"
) -> str:
    """
    Check the URI of another daemon this daemon is asked to call (p2p ``dest_uri``, ``peer_uri``).

    ``tls://HOST:PORT`` with HOST in *networks*; ``tcp://`` and ``unix://``
    only when the daemon runs with ``--insecure``.
    """
    if not isinstance(uri, str) or not uri or len(uri) > 4096:
        raise invalid_value(f"{what} URI", uri, "expected tls://HOST:PORT")
    endpoint = parse_uri(uri)
    if endpoint.scheme == "tls" or (endpoint.scheme == "tcp" and insecure):
        await resolve_allowed(check_host(endpoint.host, f"{what} host"), networks, what)
        return uri
    if endpoint.scheme == "unix" and insecure:
        return uri
    raise VmferryError(
        ErrorCode.OPERATION_INVALID,
        f"{what} URI scheme '{endpoint.scheme}' is not allowed: the daemons talk over "
        "tls://HOST:PORT (plain tcp:// and unix:// only when vmferryd runs with --insecure)",
    )
