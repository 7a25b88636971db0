"""The link an evacuation's migrations take turns on (vmferry.migration.linkshare)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from vmferry.migration import linkshare
from vmferry.migration.params import MigrationParams
from vmferry.qemu.migration_status import MigrationStatus


class Mon:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def execute(self, cmd: str, args: Any = None) -> dict[str, Any]:
        self.calls.append((cmd, args))
        return {}


class Dom:
    """The parts of a QemuDomain the link looks at: its job, its migration's status."""

    def __init__(self, name: str) -> None:
        self.name, self.uuid = name, f"uuid-{name}"
        self.job = SimpleNamespace(abort_requested=False)
        self.migration = SimpleNamespace(status=MigrationStatus.ACTIVE)
        self._changed = asyncio.Event()

    def set_status(self, status: MigrationStatus) -> None:
        self.migration.status = status
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()
        return True


def dom(name: str) -> Any:
    return Dom(name)


async def test_one_sends_at_a_time_at_the_whole_link_in_arrival_order() -> None:
    link = linkshare.Link("b", 32)
    a, b, c = dom("a"), dom("b"), dom("c")
    order: list[str] = []

    async def send(d: Any) -> None:
        linkshare.assign(d.uuid, link)
        params = MigrationParams(bandwidth_mib_s=32)
        mon = Mon()
        assert await linkshare.admit(d, params, mon)  # type: ignore[arg-type]
        order.append(d.name)
        assert params.bandwidth_mib_s == 32 and not mon.calls  # the cap applied already
        assert list(link.sending) == [d.uuid]  # alone on the link
        await asyncio.sleep(0.01)
        await linkshare.release(d)
        linkshare.unassign(d.uuid)

    first = asyncio.create_task(send(a))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(send(b)), asyncio.create_task(send(c))]
    await asyncio.gather(first, *rest)
    assert order == ["a", "b", "c"]
    assert link.left == {a.uuid, b.uuid, c.uuid} and not link.sending and not link.waiting


async def test_release_wakes_the_drain_and_an_unknown_release_is_ignored() -> None:
    changed = asyncio.Event()
    link = linkshare.Link("b", 32, changed=changed)
    a = dom("a")
    await link.leave(a)  # never joined: nothing happens
    assert not changed.is_set()
    assert await link.join(a) == 32
    await link.leave(a)
    assert changed.is_set() and a.uuid in link.left


async def test_an_aborted_migration_stops_waiting_for_its_turn() -> None:
    link = linkshare.Link("b", 32)
    a, b = dom("a"), dom("b")
    await link.join(a)
    linkshare.assign(b.uuid, link)
    params = MigrationParams(bandwidth_mib_s=7)
    waiting = asyncio.create_task(linkshare.admit(b, params, Mon()))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not waiting.done() and link.waiting == [b.uuid]
    b.job.abort_requested = True
    await asyncio.wait_for(waiting, 5)
    assert params.bandwidth_mib_s == 7  # not admitted: the perform step raises its abort
    assert b.uuid not in link.sending and not link.waiting
    linkshare.unassign(b.uuid)


async def test_a_cap_other_than_the_link_is_set_when_its_turn_comes() -> None:
    link, a, mon = linkshare.Link("b", 32), dom("a"), Mon()
    linkshare.assign(a.uuid, link)
    params = MigrationParams(bandwidth_mib_s=5)
    assert await linkshare.admit(a, params, mon)  # type: ignore[arg-type]
    assert params.bandwidth_mib_s == 32
    assert mon.calls == [("migrate-set-parameters", {"max-bandwidth": 32 << 20})]
    await linkshare.release(a)
    linkshare.unassign(a.uuid)


async def test_a_migration_with_no_link_keeps_its_own_cap() -> None:
    params, mon = MigrationParams(bandwidth_mib_s=5), Mon()
    assert not await linkshare.admit(dom("x"), params, mon)  # type: ignore[arg-type]
    await linkshare.release(dom("x"))
    assert params.bandwidth_mib_s == 5 and not mon.calls


async def _a_sends_b_waits(link: linkshare.Link) -> tuple[Any, Any, asyncio.Task[bool]]:
    """Domains a and b on *link*: a admitted (it sends), b's admission waiting behind it."""
    a, b = dom("a"), dom("b")
    for d in (a, b):
        linkshare.assign(d.uuid, link)
    assert await linkshare.admit(a, MigrationParams(bandwidth_mib_s=32), Mon())  # type: ignore[arg-type]
    waiting = asyncio.create_task(
        linkshare.admit(b, MigrationParams(bandwidth_mib_s=32), Mon())  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.05)
    return a, b, waiting


async def test_a_sender_leaves_its_link_when_its_stream_is_over() -> None:
    changed = asyncio.Event()
    link = linkshare.Link("b", 32, changed=changed)
    a, b, waiting = await _a_sends_b_waits(link)
    assert not waiting.done()  # a still pre-copies at the whole link
    a.set_status(MigrationStatus.DEVICE)  # the switchover: the last pages go, uncapped
    await asyncio.sleep(0.05)
    assert not waiting.done()  # they would share a real link with b's stream
    a.set_status(MigrationStatus.COMPLETED)  # QEMU's event, before a's final statistics
    assert await asyncio.wait_for(waiting, 5)
    assert list(link.sending) == [b.uuid] and a.uuid in link.left and changed.is_set()
    a_start, a_end = link.turns[a.uuid]
    assert 0 < a_start <= a_end <= link.turns[b.uuid][0]  # b's turn began as a's ended
    assert link.turns[b.uuid][1] == 0.0  # b still sends
    await linkshare.release(a)  # a completes later: b keeps the link
    assert list(link.sending) == [b.uuid]
    await linkshare.release(b)
    assert not link.sending
    for d in (a, b):
        linkshare.unassign(d.uuid)


async def test_a_failed_stream_hands_the_link_over_too() -> None:
    link = linkshare.Link("b", 32)
    a, b, waiting = await _a_sends_b_waits(link)
    a.set_status(MigrationStatus.FAILED)  # before the perform step releases it
    assert await asyncio.wait_for(waiting, 5)
    for d in (a, b):
        await linkshare.release(d)
        linkshare.unassign(d.uuid)
    assert not link.sending
