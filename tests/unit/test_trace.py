"""vmferry.trace: the timing hooks the benchmark listens to (instead of patching internals)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry import trace
from vmferry.daemon.state import atomic_write
from vmferry.qemu.domain import QemuDomain


@pytest.fixture
def records() -> Iterator[list[trace.Record]]:
    got: list[trace.Record] = []
    remove = trace.add_listener(got.append)
    yield got
    remove()
    assert not trace.enabled()


def test_without_a_listener_nothing_is_built() -> None:
    def label() -> str:
        raise AssertionError("a label built although nobody listens")

    assert not trace.enabled()
    with trace.span("qmp", label):
        pass
    trace.point("socket poll", "found")


def test_span_and_point(records: list[trace.Record]) -> None:
    with trace.span("qmp", lambda: "query-status"):
        pass
    trace.point("qemu downtime", wall=12.5, seconds=0.25)
    (w0, s0, k0, what0), second = records
    assert (k0, what0) == ("qmp", "query-status") and s0 >= 0 and w0 > 0
    assert second == (12.5, 0.25, "qemu downtime", "")


def test_span_records_a_failing_block(records: list[trace.Record]) -> None:
    with pytest.raises(ValueError), trace.span("qemu kill"):
        raise ValueError
    assert [r[2] for r in records] == ["qemu kill"]


def test_status_writes_name_their_caller(records: list[trace.Record], tmp_path: Path) -> None:
    def save_status() -> None:
        atomic_write(tmp_path / "s.json", "{}", durable=False)

    save_status()
    ((_, _, kind, who),) = records
    assert kind == "status write"
    assert who.split(" < ")[:2] == ["atomic_write", "save_status"]


async def test_waits_are_labelled_with_the_waiter(records: list[trace.Record]) -> None:
    dom = QemuDomain.__new__(QemuDomain)
    dom._changed = asyncio.Event()  # type: ignore[attr-defined]

    async def confirm_step() -> bool:
        return await dom.wait_for(lambda: True, 1.0)

    assert await confirm_step()
    assert [(r[2], r[3]) for r in records] == [("wait", "confirm_step")]
