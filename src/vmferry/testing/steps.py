"""
A migration driven one protocol step at a time, as the fault and cookie tests
need it, and the check every such test ends with.

:func:`migration_steps` opens both daemons' clients and migration sessions
(what :func:`vmferry.client.migrate.migrate` does before Begin) and hands the
test the two ends to call ``begin``/``prepare``/``perform``/``finish``/
``confirm`` on, with whatever it forges in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

from vmferry.client import AsyncClient
from vmferry.client.migrate import RemoteDestination, RemoteSource, open_session
from vmferry.testguest import Heartbeat, check_continuity
from vmferry.testing.daemons import Host
from vmferry.testing.heartbeat import wait_heartbeat


class Steps(NamedTuple):
    """Both daemons' clients and the two ends of one migration: ``(s, d, source, dest)``."""

    s: AsyncClient
    d: AsyncClient
    source: RemoteSource
    dest: RemoteDestination


@asynccontextmanager
async def migration_steps(src: Host, dst: Host) -> AsyncIterator[Steps]:
    """Clients and sessions on *src* and *dst*, closed (the sessions first) on the way out."""
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        async with open_session(s) as ss, open_session(d) as ds:
            yield Steps(s, d, RemoteSource(s, ss), RemoteDestination(d, ds))


def assert_only_on(
    host: Host, other: Host, name: str, before: Heartbeat, *, manageable: bool = False
) -> Heartbeat:
    """
    The guest runs on *host*, no job, its memory intact since *before*, and
    nothing of it is left on *other*; with *manageable*, a suspend and a
    resume go through too (no lock was left behind).
    """
    with host.client() as c, other.client() as o:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == ("running", "none"), info
        assert name not in [d.name for d in o.list_domains(all=True)]
        after = wait_heartbeat(c, name, after=before)
        check_continuity(before, after)
        if manageable:
            c.suspend(name)
            assert c.dominfo(name).state == "paused"
            c.resume(name)
    assert len(host.qemu_pids()) >= 1
    return after
