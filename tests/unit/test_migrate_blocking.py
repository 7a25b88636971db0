"""The CLI's blocking migration driver (vmferry.client.migrate_blocking) against fake daemons.

The real protocol against two real vmferryd: tests/e2e/test_cli_migrate_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from vmferry import logs
from vmferry.client import migrate_blocking as mb
from vmferry.client.calls import Call
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags as F


class _Stream:
    def __init__(self, owner: FakeClient) -> None:
        self.owner = owner

    def iter_lines(self) -> Iterator[str]:
        hello: dict[str, Any] = {"session": f"s-{self.owner.uri}"}
        if self.owner.features is not None:
            hello["features"] = self.owner.features
        yield json.dumps(hello)


class _Sent:
    """A session request sent, its answer not read (the blocking client's ``Sent``)."""

    def __init__(self, owner: FakeClient) -> None:
        self.owner = owner

    def close(self) -> None:
        self.owner.closed += 1


class FakeClient:
    """Canned answers by path; records each call's method and path."""

    def __init__(self, uri: str, answers: dict[str, Any]) -> None:
        self.uri = uri
        self.answers = answers
        self.calls: list[str] = []
        self.closed = 0
        self.features: list[str] | None = ["migration-v3"]  # sent with the session
        self.order: list[str] = []  # session requests sent and answers read, both clients'

    def fetch(self, call: Call[Any], *, request_timeout: float | None = None) -> Any:
        self.calls.append(f"{call.method} {call.path}")
        answer = self.answers[call.path]
        if isinstance(answer, VmferryError):
            raise answer
        return answer

    def send_stream(self, path: str) -> _Sent:
        assert path == "/v1/session"
        self.order.append(f"send {self.uri}")
        return _Sent(self)

    def stream_answer(self, sent: _Sent, path: str) -> _Stream:
        assert sent.owner is self and path == "/v1/session"
        self.order.append(f"answer {self.uri}")
        return _Stream(self)


SRC_STATS = {"guest_downtime_ms": 30, "downtime_ms": 20, "policy": "vmferry"}
DST_STATS = {"downtime_ms": 21, "total_time_ms": 300}


def _daemons(*, with_stats: bool = True) -> tuple[FakeClient, FakeClient]:
    src = FakeClient(
        "unix:///src.sock",
        {
            "/v1/domains/g1/migrate/begin": {"xml": "<domain/>", "cookie": "c1"},
            "/v1/domains/g1/migrate/perform": {"cookie": "c3"},
            "/v1/domains/g1/migrate/confirm": {"cookie": "", "stats": SRC_STATS}
            if with_stats
            else {"cookie": ""},
            "/v1/domains/g1/jobinfo": {"type": "completed", "stats": {"policy": "old"}},
        },
    )
    dst = FakeClient(
        "unix:///dst.sock",
        {
            "/v1/host": {"features": ["migration-v3"]},
            "/v1/migrate/prepare": {"uri": "tcp:127.0.0.1:1", "cookie": "c2"},
            "/v1/domains/g1/migrate/finish": {"cookie": "c4", "stats": DST_STATS}
            if with_stats
            else {"cookie": "c4"},
            "/v1/domains/g1/jobinfo": {"type": "completed", "stats": {"downtime_ms": 9}},
        },
    )
    dst.order = src.order
    return src, dst


def test_v3_steps_and_stats_from_the_replies() -> None:
    src, dst = _daemons()
    before = logs.current_migration()  # another test of this process may have bound one
    seen: list[tuple[str, Any]] = []
    report = mb.migrate(
        src,  # type: ignore[arg-type]
        dst,  # type: ignore[arg-type]
        "g1",
        F.LIVE,
        progress=lambda step, stats: seen.append((step, stats)),
        poll=False,
    )
    assert [c.split()[1].rsplit("/", 1)[-1] for c in src.calls] == ["begin", "perform", "confirm"]
    # The destination's features came with its session: no /v1/host round trip.
    assert [c.split()[1].rsplit("/", 1)[-1] for c in dst.calls] == ["prepare", "finish"]
    # No jobinfo round trips: Finish and Confirm brought the figures, the destination's first.
    assert report.stats == {**SRC_STATS, **DST_STATS}
    assert list(report.steps) == ["begin", "prepare", "perform", "finish", "confirm"]
    assert [s for s, _ in seen] == list(report.steps)
    assert report.migration_id and (src.closed, dst.closed) == (1, 1)  # sessions closed
    # Both sessions asked for before either answer is read: one wait, not two.
    assert src.order == [
        "send unix:///src.sock",
        "send unix:///dst.sock",
        "answer unix:///src.sock",
        "answer unix:///dst.sock",
    ]
    # the id was bound for the call only
    assert logs.current_migration() == before != report.migration_id


def test_older_daemons_are_asked_with_jobinfo_and_host() -> None:
    src, dst = _daemons(with_stats=False)
    dst.features = None
    report = mb.migrate(src, dst, "g1", F.LIVE, poll=False)  # type: ignore[arg-type]
    assert report.stats == {"policy": "old", "downtime_ms": 9}
    assert dst.calls[0] == "GET /v1/host"
    assert src.calls[-1].endswith("/jobinfo") and dst.calls[-1].endswith("/jobinfo")


def test_failed_prepare_cancels_on_the_source() -> None:
    src, dst = _daemons()
    dst.answers["/v1/migrate/prepare"] = VmferryError(ErrorCode.OPERATION_FAILED, "no room")
    with pytest.raises(VmferryError, match="no room"):
        mb.migrate(src, dst, "g1", F.LIVE, poll=False)  # type: ignore[arg-type]
    assert src.calls[-1] == "POST /v1/domains/g1/migrate/confirm"  # cancelled=True
    assert (src.closed, dst.closed) == (1, 1)


def test_run_blocking_refuses_a_coroutine_that_waits() -> None:
    class _Waits:
        def __await__(self) -> Iterator[None]:
            yield None

    async def waits() -> int:
        await _Waits()
        return 1

    async def plain() -> int:
        return 2

    assert mb.run_blocking(plain()) == 2
    with pytest.raises(VmferryError) as err:
        mb.run_blocking(waits())
    assert err.value.code == ErrorCode.INTERNAL_ERROR
