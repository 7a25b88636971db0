"""Python client of vmferryd, blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Example::

    from vmferry.client import Client

    with Client("unix:///run/vmferry/vmferryd.sock") as client:
        for dom in client.list_domains(all=True):
            print(dom.name, dom.state)

Both clients raise :class:`vmferry.errors.VmferryError` only: the daemon's
own errors unchanged, ``CONNECT_FAILED`` when the daemon cannot be reached,
``INVALID_ARG`` for a bad URI.
"""

from vmferry.client.aio import AsyncClient, AsyncEventStream
from vmferry.client.calls import Call
from vmferry.client.sync import Client, EventStream
from vmferry.client.transport import (
    DEFAULT_TIMEOUT,
    PKI_DIR_ENV,
    Endpoint,
    parse_uri,
    resolve_pki_dir,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "PKI_DIR_ENV",
    "AsyncClient",
    "AsyncEventStream",
    "Call",
    "Client",
    "Endpoint",
    "EventStream",
    "parse_uri",
    "resolve_pki_dir",
]
