"""Fan-out of domain lifecycle events to every subscribed client stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from vmferry.api.models import Event

_QUEUE_SIZE = 1000


class EventBus:
    """Publishes events to subscribers; a subscriber that falls too far behind loses the oldest."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Event]] = set()

    def publish(self, event: Event) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(_QUEUE_SIZE)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
