"""Python client of vmferryd, blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Example::

    from vmferry.client import Client

    with Client("unix:///run/vmferry/vmferryd.sock") as client:
        for dom in client.list_domains(all=True):
            print(dom.name, dom.state)

Both clients raise :class:`vmferry.errors.VmferryError` only: the daemon's
own errors unchanged, ``CONNECT_FAILED`` when the daemon cannot be reached,
``INVALID_ARG`` for a bad URI.

:class:`Client` speaks HTTP with the standard library and imports pydantic
only to parse answers into models; :class:`AsyncClient` (httpx) is imported
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmferry.client.calls import Call
from vmferry.client.sync import Client, EventStream
from vmferry.client.transport import (
    DEFAULT_TIMEOUT,
    PKI_DIR_ENV,
    Endpoint,
    parse_uri,
    resolve_pki_dir,
)

if TYPE_CHECKING:
    from vmferry.client.aio import AsyncClient, AsyncEventStream


def __getattr__(name: str) -> Any:
    # The asyncio client imports httpx and the API models: only for those who use it,
    # not for every `import vmferry.client` (the CLI's fast commands: docs/cli.md).
    if name in ("AsyncClient", "AsyncEventStream"):
        from vmferry.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
