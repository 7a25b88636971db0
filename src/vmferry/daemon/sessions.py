"""Client sessions: the daemon's notion of "the connection that asked".

libvirt binds an incoming migration to the connection that prepared it and
destroys the domain when that connection closes before Finish. Over HTTP a
session is one long streaming request (``GET /v1/session``) that the client
keeps open; when it ends, for whatever reason, the session's close callbacks run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

log = logging.getLogger(__name__)

# A keepalive line lets the client see a dead daemon too.
KEEPALIVE_S = 5.0


class Sessions:
    """Open sessions and the domains bound to each."""

    def __init__(
        self,
        on_close: Callable[[str, set[str]], Coroutine[Any, Any, None]],
        *,
        features: Sequence[str] = (),
    ) -> None:
        # The first line carries the host's features too: a client needs no /v1/host call.
        self._hello = {"features": list(features)} if features else {}
        self._bound: dict[str, set[str]] = {}
        self._on_close = on_close
        self._tasks: set[asyncio.Task[None]] = set()

    def is_open(self, session: str) -> bool:
        return session in self._bound

    async def stream(self) -> AsyncIterator[bytes]:
        """The body of ``GET /v1/session``: the id, then keepalives until the client goes."""
        session = uuid.uuid4().hex
        self._bound[session] = set()
        try:
            yield (json.dumps({"session": session, **self._hello}) + "\n").encode()
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                yield b"\n"
        finally:
            # Runs in a cancelled generator: hand the callbacks to a task of their own.
            bound = self._bound.pop(session, set())
            if bound:
                task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
                    self._on_close(session, bound)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def bind(self, session: str, domain_uuid: str) -> None:
        if session not in self._bound:
            raise KeyError(session)
        self._bound[session].add(domain_uuid)

    def unbind(self, session: str, domain_uuid: str) -> None:
        self._bound.get(session, set()).discard(domain_uuid)
