"""Connection limits of a listener: how many clients, how long they may stay silent.

uvicorn only times out a keep-alive connection after a response; a
connection that never sends a request (or sends its headers a byte at a
time) would stay forever, and enough of them used to make the daemon stop
answering.  :func:`protocol_class` makes uvicorn's HTTP/1.1 protocol

* close a connection whose request headers are not complete within
  ``idle_timeout`` seconds of its start or of its previous response;
* keep at most ``max_clients`` connections per listener: when full, the
  oldest connection with no request in progress is closed to make room; if
  every one is busy, the newcomer gets 503 ``{code, message}`` and is closed.

A request in progress is never cut, so long-lived streams (``GET /v1/events``,
``GET /v1/session``) last as long as their clients.  The TLS handshake
timeout is set where the listening server is created (:mod:`vmferry.daemon.listen`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vmferry.daemon.guard import error_body
from vmferry.errors import ErrorCode

log = logging.getLogger(__name__)


class _GuardedH11(H11Protocol):
    max_clients = 128
    idle_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_deadline: asyncio.TimerHandle | None = None
        self.born = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        others = [c for c in self.connections if c is not self]
        super().connection_made(transport)
        self.born = self.loop.time()
        if len(others) >= self.max_clients and not self._make_room(others):
            log.warning("refusing a connection: %d clients (max_clients) are busy", len(others))
            body, headers = error_body(
                ErrorCode.OPERATION_FAILED,
                f"too many clients ({self.max_clients} connections busy); try again later",
            )
            head = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"connection: close\r\n\r\n" + body
            )
            transport.close()
            return
        self._arm()

    def _make_room(self, others: list[Any]) -> bool:
        idle = [c for c in others if isinstance(c, _GuardedH11) and c.idle()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.born)
        log.debug("max_clients reached: closing the oldest idle connection")
        oldest.close_idle()
        return True

    def idle(self) -> bool:
        """No request in progress (nothing sent, or the last response is complete)."""
        in_request = self.cycle is not None and not self.cycle.response_complete
        return not in_request and self.conn.their_state in (h11.IDLE, h11.DONE)

    def close_idle(self) -> None:
        self._disarm()
        self.connections.discard(self)  # counts as gone at once, before connection_lost
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._request_deadline = self.loop.call_later(self.idle_timeout, self._deadline_passed)

    def _disarm(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def _deadline_passed(self) -> None:
        self._request_deadline = None
        if self.idle():
            self.close_idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.DONE):
            self._disarm()  # headers complete: the request runs as long as it needs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a malformed request (bad framing, headers too large), as JSON.
        body, headers = error_body(ErrorCode.INVALID_ARG, "invalid HTTP request")
        headers.append((b"connection", b"close"))
        try:
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response had started already: closing is all that is left
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(*, max_clients: int, idle_timeout: float) -> type[H11Protocol]:
    """uvicorn's ``http`` protocol with these limits (one class per listener)."""
    return type(
        "GuardedH11Protocol",
        (_GuardedH11,),
        {"max_clients": max_clients, "idle_timeout": idle_timeout},
    )
