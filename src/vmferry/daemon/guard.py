"""What keeps hostile or broken HTTP requests cheap: error bodies, body limits, log flood control.

* Every error leaves as ``{"code", "message"}`` with no Python text: routing
  errors (404, 405), validation errors (400), oversized bodies (413), a body
  that stops arriving (408) and unexpected exceptions (500, with a generic
  message and an id that names the log line holding the traceback).
* :class:`GuardMiddleware` refuses a body over ``[limits] max_body_bytes``
  before reading it (by ``Content-Length``) or as soon as it grows past it
  (chunked), and answers a 500 itself so the keep-alive connection stays
  usable instead of being dropped by the server.
* :class:`RateLimitFilter` logs a repeated identical warning or error once per
  interval, with the count of the ones it held back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

# Codes of the errors that happen before a route runs.
_HTTP_CODES = {
    404: ErrorCode.NO_SUPPORT,
    405: ErrorCode.NO_SUPPORT,
    408: ErrorCode.OPERATION_TIMEOUT,
    413: ErrorCode.INVALID_ARG,
}


def error_body(code: ErrorCode | str, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A JSON ``{code, message}`` body and its headers, for a response sent by hand."""
    body = json.dumps({"code": str(code), "message": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return body, headers


def install_error_handlers(app: FastAPI) -> None:
    """Make routing errors (unknown path, wrong method, ...) ``{code, message}`` too."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(err.status_code, ErrorCode.INVALID_ARG)
        if err.status_code == 404:
            message = f"no such API: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif isinstance(err.detail, str) and err.detail:
            message = f"invalid request: {err.detail[:200]}"  # Starlette's and FastAPI's texts
        else:
            message = f"invalid request (HTTP {err.status_code})"
        return JSONResponse(
            status_code=err.status_code,
            content={"code": str(code), "message": message},
            headers=err.headers,
        )


def validation_message(errors: list[Any]) -> str:
    """One line naming the first invalid field, with pydantic's message but never the input."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) if isinstance(first, dict) else ""
    msg = str(first.get("msg", "")) if isinstance(first, dict) else ""
    return f"invalid request: {where}: {msg[:200]}"


class _Refused(Exception):
    """The guard has already answered this request (413/408); the app must stop."""


class GuardMiddleware:
    """Body size limit, body idle timeout and a generic 500 that keeps the connection."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        idle_timeout: float,
        streamed_uploads: re.Pattern[str] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        # PUT paths whose route streams the body and sets its own limit (a volume upload)
        self.streamed_uploads = streamed_uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        answered = False

        async def reply(status: int, code: ErrorCode | str, message: str, *, close: bool) -> None:
            nonlocal started, answered
            body, headers = error_body(code, message)
            if close:  # the rest of the body is unread: the connection cannot be reused
                headers.append((b"connection", b"close"))
            started = answered = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        limit = self.max_body_bytes
        if (
            self.streamed_uploads is not None
            and scope.get("method") == "PUT"
            and self.streamed_uploads.match(scope.get("path", ""))
        ):
            # the route bounds it (a volume upload); the idle timeout still applies
            limit = sys.maxsize
        length = _content_length(scope)
        if length is not None and length > limit:
            await reply(413, ErrorCode.INVALID_ARG, self._too_large(), close=True)
            return

        received = 0
        body_done = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls only wait for a disconnect (streaming responses)
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except TimeoutError:
                if not started:
                    await reply(
                        408,
                        ErrorCode.OPERATION_TIMEOUT,
                        f"request body not received within {self.idle_timeout:g} s",
                        close=True,
                    )
                raise _Refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        await reply(413, ErrorCode.INVALID_ARG, self._too_large(), close=True)
                    raise _Refused
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the app goes on after our 413/408 (e.g. FastAPI's own body error)
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused:
            return
        except VmferryError as err:  # raised outside the routes (e.g. by another middleware)
            if not started:
                await reply(err.http_status, err.code, err.message, close=False)
        except Exception as err:
            if answered:
                return
            error_id = uuid.uuid4().hex[:12]
            log.error(
                "internal error %s in %s %s",
                error_id,
                scope.get("method"),
                scope.get("path"),
                exc_info=err,
            )
            if started:
                return  # too late for an error body: the server closes the connection
            await reply(
                500,
                ErrorCode.INTERNAL_ERROR,
                f"internal error; see the daemon log, id {error_id}",
                close=False,
            )

    def _too_large(self) -> str:
        return f"request body too large: the limit is {self.max_body_bytes} bytes"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value[:20])  # 20 digits are > 2**64: no huge-int parsing
            except ValueError:
                return None
    return None


def vmferry_error_response(err: VmferryError) -> JSONResponse:
    return JSONResponse(status_code=err.http_status, content=err.to_dict())


# -- log flood control -----------------------------------------------------------------------


_VARYING = re.compile(r"[0-9a-fA-F]{8,}|\d+")


class RateLimitFilter(logging.Filter):
    """
    Let one of a run of identical warnings/errors through per *interval* seconds.

    Records are the same when logger, level, message and exception type
    match; numbers and long hex ids in the message (ports, pids, error ids)
    do not count.  The first one after a quiet interval carries the count of
    those held back.  Info and debug records pass untouched.
    """

    MAX_KEYS = 1024

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, int, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self.interval <= 0 or record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        try:
            text = _VARYING.sub("#", record.getMessage())
        except Exception:  # a record with bad arguments: logging reports it itself
            return True
        key = (record.name, record.levelno, text, exc)
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            held, since = last[1], now - last[0]
            record.msg = f"{record.msg} [{held} more like this in the last {since:.0f} s]"
        return True


def install_log_rate_limit(interval: float) -> RateLimitFilter:
    """Attach one :class:`RateLimitFilter` to every handler of the root logger."""
    flt = RateLimitFilter(interval)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    return flt
