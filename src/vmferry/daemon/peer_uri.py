"""Which daemons this one may be asked to call (p2p ``dest_uri``, Perform's ``peer_uri``)."""

from __future__ import annotations

from vmferry.client.transport import parse_uri
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration import uri as muri


async def check_peer_uri(
    uri: object, networks: list[muri.IPNetwork], *, insecure: bool, what: str = "destination"
) -> str:
    """
    Check the URI of another daemon this daemon is asked to call (p2p ``dest_uri``, ``peer_uri``).

    ``tls://HOST:PORT`` with HOST in *networks*; ``tcp://`` and ``unix://``
    only when the daemon runs with ``--insecure``.
    """
    if not isinstance(uri, str) or not uri or len(uri) > 4096:
        raise muri.bad_value(f"{what} URI", uri, "expected tls://HOST:PORT")
    endpoint = parse_uri(uri)
    if endpoint.scheme == "tls" or (endpoint.scheme == "tcp" and insecure):
        await muri.resolve_allowed(muri.check_host(endpoint.host, f"{what} host"), networks, what)
        return uri
    if endpoint.scheme == "unix" and insecure:
        return uri
    raise VmferryError(
        ErrorCode.OPERATION_INVALID,
        f"{what} URI scheme '{endpoint.scheme}' is not allowed: the daemons talk over "
        "tls://HOST:PORT (plain tcp:// and unix:// only when vmferryd runs with --insecure)",
    )

