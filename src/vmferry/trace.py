"""
Timing hooks for benchmarks: where a migration's time goes, below its steps.

Code that a migration waits for marks it with :func:`span` (a duration) or
:func:`point` (an instant); a listener added with :func:`add_listener` (e.g.
``bench/migrate_bench.py --trace``) receives each as a :data:`Record`. With no
listener, and that is the daemon's normal state, both cost one list check.
Outside the layers and importing nothing of vmferry, so every layer may call it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

#: (wall-clock start, seconds, kind, what): kind says what was timed ("qmp",
#: "status write", "qemu launch", ...), what which one (a QMP command, a caller).
Record = tuple[float, float, str, str]
Listener = Callable[[Record], None]

_listeners: list[Listener] = []


def add_listener(listener: Listener) -> Callable[[], None]:
    """Send every record to *listener* from now on; returns the function that removes it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def enabled() -> bool:
    """Whether anybody listens (build expensive labels only then)."""
    return bool(_listeners)


def point(kind: str, what: str = "", *, wall: float | None = None, seconds: float = 0.0) -> None:
    """Record an instant (or a duration measured elsewhere) starting at *wall* (now if None)."""
    if _listeners:
        _emit((time.time() if wall is None else wall, seconds, kind, what))


@contextlib.contextmanager
def span(kind: str, what: str | Callable[[], str] = "") -> Iterator[None]:
    """Record how long the block takes; *what* may be a function, called only when traced."""
    if not _listeners:
        yield
        return
    wall, started = time.time(), time.perf_counter()
    label = what() if callable(what) else what
    try:
        yield
    finally:
        _emit((wall, time.perf_counter() - started, kind, label))


def caller(skip: frozenset[str] = frozenset(), depth: int = 1) -> str:
    """The first *depth* functions up the stack outside this module, contextlib and *skip*."""
    names: list[str] = []
    frame: Any = sys._getframe(1)
    while frame is not None and len(names) < depth:
        code = frame.f_code
        if (
            code.co_filename not in (__file__, contextlib.__file__)
            and code.co_name not in skip
            and not code.co_name.startswith("<")
        ):
            names.append(code.co_name)
        frame = frame.f_back
    return " < ".join(names)


def _emit(record: Record) -> None:
    for listener in list(_listeners):
        listener(record)


def timed_asgi(app: Any, *, skip: tuple[str, ...] = ()) -> Any:
    """*app* with every HTTP request recorded as ``("api", "METHOD path")``.

    Paths ending in one of *skip* (long-lived streams) are not recorded.
    """

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].endswith(skip) or not _listeners:
            await app(scope, receive, send)
            return
        with span("api", f"{scope['method']} {scope['path']}"):
            await app(scope, receive, send)

    return asgi
