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

if TYPE_CHECKING:
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

# Each name is imported from its module on first use (PEP 562): `import
# vmferry.client.calls` does not load the HTTP code, and the asyncio client
# (httpx, the API models) is loaded only by those who use it (docs/cli.md).
_WHERE = {
    "AsyncClient": "aio",
    "AsyncEventStream": "aio",
    "Call": "calls",
    "Client": "sync",
    "EventStream": "sync",
    "DEFAULT_TIMEOUT": "transport",
    "PKI_DIR_ENV": "transport",
    "Endpoint": "transport",
    "parse_uri": "transport",
    "resolve_pki_dir": "transport",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"vmferry.client.{_WHERE[name]}"), name)


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
