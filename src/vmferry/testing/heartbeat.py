"""Reading the test guest's heartbeat from a console, sync or async."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vmferry.client import Client
from vmferry.testguest import Heartbeat, guest_xml, last_heartbeat

#: How long a heartbeat may take to come: a deadline, not a target. A first boot takes ~3 s on
#: a quiet machine but 50-70 s at load 25 (TCG shares the cores with everything else).
HEARTBEAT_TIMEOUT_S = 180.0


def _newer(hb: Heartbeat | None, after: Heartbeat | None) -> bool:
    return hb is not None and (after is None or hb.seq > after.seq or hb.boot != after.boot)


def wait_heartbeat(
    client: Client,
    name: str,
    *,
    after: Heartbeat | None = None,
    timeout: float = HEARTBEAT_TIMEOUT_S,
) -> Heartbeat:
    """The guest's newest heartbeat once it is past *after* (or the first one)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = client.console(name).data
        hb = last_heartbeat(text)
        if hb is not None and _newer(hb, after):
            return hb
        time.sleep(0.2)
    raise AssertionError(f"no heartbeat from {name} within {timeout} s; console:\n{text[-2000:]}")


async def poll_heartbeat(
    read: Callable[[], Awaitable[str]],
    *,
    after: Heartbeat | None = None,
    timeout: float = HEARTBEAT_TIMEOUT_S,
    interval: float = 0.1,
) -> Heartbeat:
    """Like :func:`wait_heartbeat`, reading the console text with the coroutine *read*.

    Raises AssertionError (with the console's tail) when none comes within *timeout*.
    """
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = await read()
        hb = last_heartbeat(text)
        if hb is not None and _newer(hb, after):
            return hb
        await asyncio.sleep(interval)
    raise AssertionError(f"no new heartbeat within {timeout:g} s; console ends:\n{text[-1500:]}")


def boot_guest(
    client: Client, name: str, *, timeout: float = HEARTBEAT_TIMEOUT_S, **xml: Any
) -> Heartbeat:
    """Create (transient) the test guest *name* and return its first heartbeat.

    *xml* goes to :func:`vmferry.testguest.guest_xml` (memory_mib, hb_ms, ...).
    """
    client.create(guest_xml(name, **xml))
    return wait_heartbeat(client, name, timeout=timeout)
