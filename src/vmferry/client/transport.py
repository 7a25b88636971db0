"""Where vmferryd is and how its answers become values or :class:`VmferryError`.

A vmferryd URI names one listener of the daemon:

    unix:///run/vmferry/vmferryd.sock   HTTP over a unix socket
    tls://host:port                     HTTPS with mutual TLS (``vmferry.pki``)
    tcp://host:port                     plain HTTP (the daemon decides whether it allows that)

Nothing here does I/O: :class:`~vmferry.client.sync.Client` and
:class:`~vmferry.client.aio.AsyncClient` both use these helpers, so URI
rules and error mapping are the same for both.  Nothing heavy is imported
here (the CLI's fast commands go through it: docs/cli.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    from vmferry.api.models import Event
    from vmferry.client.calls import Call
    from vmferry.client.http1 import Answer

T = TypeVar("T")

#: Seconds to wait for an answer unless told otherwise; generous because
#: shutdown and the steps of a migration take long.
DEFAULT_TIMEOUT = 120.0

PKI_DIR_ENV = "VMFERRY_PKI_DIR"
DEFAULT_PKI_DIR = "~/.config/vmferry/pki"

Scheme = Literal["unix", "tls", "tcp"]
_EXAMPLES = "unix:///path/to/vmferryd.sock, tls://host:port or tcp://host:port"


class Endpoint(NamedTuple):
    """A parsed vmferryd URI."""

    uri: str
    scheme: Scheme
    socket_path: str = ""  # unix only
    host: str = ""  # tls and tcp
    port: int = 0

    @property
    def base_url(self) -> str:
        """The URL httpx sends requests to (the host part names the TLS peer)."""
        if self.scheme == "unix":
            return "http://vmferry"
        host = f"[{self.host}]" if ":" in self.host else self.host
        proto = "https" if self.scheme == "tls" else "http"
        return f"{proto}://{host}:{self.port}"


def parse_uri(uri: str) -> Endpoint:
    """
    Parse a vmferryd URI.

    :raise VmferryError: ``INVALID_ARG`` if *uri* is not one of the three forms.
    """

    def bad(why: str) -> VmferryError:
        return VmferryError(ErrorCode.INVALID_ARG, f"invalid vmferryd URI '{uri}': {why}")

    if uri.startswith("unix:"):
        # By hand, as urlsplit would: the local case must not import urllib.parse
        # (and ipaddress with it) on the CLI's fast path.
        if "?" in uri or "#" in uri:
            raise bad("no query or fragment allowed")
        rest = uri[len("unix:") :]
        if not rest.startswith("///"):
            raise bad("expected unix:///absolute/path.sock (three slashes)")
        return Endpoint(uri, "unix", socket_path=rest[2:])
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from exc
    if parts.query or parts.fragment:
        raise bad("no query or fragment allowed")
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise bad("expected unix:///absolute/path.sock (three slashes)")
        return Endpoint(uri, "unix", socket_path=parts.path)
    if parts.scheme in ("tls", "tcp"):
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise bad(f"expected {parts.scheme}://host:port")
        if parts.username or parts.password:
            raise bad("no user or password allowed")
        scheme: Scheme = "tls" if parts.scheme == "tls" else "tcp"
        return Endpoint(uri, scheme, host=parts.hostname, port=port)
    raise bad(f"unsupported scheme '{parts.scheme}': use {_EXAMPLES}")


def resolve_pki_dir(pki_dir: Path | str | None) -> Path:
    """*pki_dir*, else ``$VMFERRY_PKI_DIR``, else ``~/.config/vmferry/pki``."""
    from pathlib import Path  # only for tls://: unix-socket commands skip pathlib

    if pki_dir is not None:
        return Path(pki_dir).expanduser()
    env = os.environ.get(PKI_DIR_ENV)
    return Path(env or DEFAULT_PKI_DIR).expanduser()


def ssl_context(endpoint: Endpoint, pki_dir: Path | str | None) -> ssl.SSLContext | None:
    """The TLS context of a ``tls://`` endpoint (its files loaded now), else ``None``."""
    if endpoint.scheme != "tls":
        return None
    # Lazy: plain unix-socket users need neither the PKI files nor cryptography.
    from vmferry.pki import client_ssl_context

    return client_ssl_context(resolve_pki_dir(pki_dir))


def request_timeout(
    call: Call[Any] | None, default: float | None, override: float | None
) -> float | None:
    """
    The read timeout of one request: *override*, else the client's *default*,
    raised to the call's own minimum (e.g. a shutdown's guest timeout).
    ``None`` disables the read timeout (streams).
    """
    seconds = override if override is not None else default
    if seconds is not None and call is not None and call.min_timeout is not None:
        seconds = max(seconds, call.min_timeout)
    return seconds


def check_status(endpoint: Endpoint, method: str, path: str, response: Answer) -> None:
    """
    Raise the daemon's error for a non-2xx *response* (its body must be read).

    A ``{"code", "message"}`` body is raised unchanged; anything else (a
    proxy, an older daemon without the route) gets a code of its own.
    """
    if response.ok:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if (
        isinstance(body, dict)
        and isinstance(body.get("code"), str)
        and isinstance(body.get("message"), str)
    ):
        raise VmferryError.from_dict(body)
    status = response.status
    if status in (404, 405):
        raise VmferryError(
            ErrorCode.NO_SUPPORT,
            f"vmferryd at {endpoint.uri} does not support {method} {path} (HTTP {status})",
        )
    text = response.text.strip()[:200]
    raise VmferryError(
        ErrorCode.INTERNAL_ERROR,
        f"unexpected answer from vmferryd at {endpoint.uri} to {method} {path}: "
        f"HTTP {status} {text}",
    )


def read_json(endpoint: Endpoint, call: Call[Any], response: Answer) -> Any:
    """The JSON of a complete *response* to *call*, or the daemon's error."""
    check_status(endpoint, call.method, call.path, response)
    try:
        return response.text if call.text else response.json()
    except ValueError as exc:
        raise _garbled(endpoint, f"{call.method} {call.path}", exc) from exc


def parse_answer(endpoint: Endpoint, call: Call[T], data: Any) -> T:
    """*call*'s value of its answer *data*; a garbled answer is ``INTERNAL_ERROR``."""
    try:
        return call.parse(data)
    except (ValueError, TypeError, KeyError) as exc:  # also pydantic's ValidationError
        raise _garbled(endpoint, f"{call.method} {call.path}", exc) from exc


def parse_event_line(endpoint: Endpoint, line: str) -> Event | None:
    """One NDJSON line of ``/v1/events``; ``None`` for a blank (keep-alive) line."""
    if not line.strip():
        return None
    from pydantic import ValidationError

    from vmferry.api.models import Event

    try:
        return Event.model_validate_json(line)
    except ValidationError as exc:
        raise _garbled(endpoint, "the event stream", exc) from exc


def _garbled(endpoint: Endpoint, what: str, exc: Exception) -> VmferryError:
    return VmferryError(
        ErrorCode.INTERNAL_ERROR,
        f"unexpected answer from vmferryd at {endpoint.uri} to {what}: {exc}",
    )
