"""Observability without daemons: log lines, the migration id, metrics and their summary."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmferry import logformat, logs
from vmferry.cli.observe_cmds import render, summarize
from vmferry.daemon.access import PERMISSIONS, AccessPolicy, Role, route_template
from vmferry.daemon.metrics import ApiMetricsMiddleware, Metrics
from vmferry.daemon.observe import MigrationObserver, bind_params, mode_of
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import AsyncJob
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.qemu.domain import QemuDomain


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logformat.setup("info", "json", stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- logs -------------------------------------------------------------------------------------


def test_json_lines_carry_the_migration_id_into_spawned_tasks(captured: io.StringIO) -> None:
    log = logging.getLogger("vmferry.test")

    async def step() -> None:
        logs.bind_migration("abc123")
        log.info("in the step")
        await asyncio.create_task(child())  # a task spawned by the step keeps the id

    async def child() -> None:
        log.warning("in a task it spawned")

    async def other() -> None:
        log.info("another request")

    async def main() -> None:
        await asyncio.gather(asyncio.create_task(step()), asyncio.create_task(other()))

    asyncio.run(main())
    lines = {x["message"]: x for x in _lines(captured)}
    assert lines["in the step"]["migration_id"] == "abc123"
    assert lines["in a task it spawned"]["migration_id"] == "abc123"
    assert lines["in a task it spawned"]["level"] == "warning"
    assert "migration_id" not in lines["another request"]  # another task, another context
    assert lines["in the step"]["logger"] == "vmferry.test"


def test_text_lines_end_with_the_migration_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logformat.formatter("text"))
    handler.addFilter(logformat.MigrationIdFilter())
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.migration_id = "m-1"
    handler.handle(record)
    assert stream.getvalue().rstrip().endswith("INFO hello you migration=m-1")
    with pytest.raises(ValueError, match="unknown log format"):
        logformat.formatter("xml")


@pytest.mark.parametrize("bad", ["a b", "x\ny", "", "-lead", "z" * 65, "é"])
def test_a_hostile_migration_id_is_refused(bad: str) -> None:
    assert not logs.is_migration_id(bad)
    if bad:
        with pytest.raises(VmferryError, match="migration_id"):
            MigrationParams.from_dict({"migration_id": bad})


def test_the_source_makes_an_id_when_the_caller_sent_none() -> None:
    params = MigrationParams()
    made = bind_params(params)
    assert logs.is_migration_id(made) and params.migration_id == made
    assert bind_params(MigrationParams(migration_id="given.1")) == "given.1"
    assert MigrationParams.from_dict({"migration_id": "given.1"}).migration_id == "given.1"


# -- access ------------------------------------------------------------------------------------


def test_read_only_role_may_read_the_metrics() -> None:
    assert PERMISSIONS[("GET", "/metrics")] == "metrics.read"
    assert AccessPolicy().allows(Role.READ_ONLY, "metrics.read")
    assert route_template("GET", "/v1/domains/g1/state") == "/v1/domains/{name}/state"
    assert route_template("POST", "/v1/domains/create") == "/v1/domains/create"
    assert route_template("GET", "/nope/../etc") is None


# -- metrics -----------------------------------------------------------------------------------


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.job_waited("query", 0.2)
    assert b'vmferry_job_wait_seconds_count{job="query"} 1.0' in one.render()
    assert b'job="query"' not in two.render()


def test_api_latency_is_labelled_by_route_never_by_raw_path() -> None:
    metrics = Metrics()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request"}

    mw = ApiMetricsMiddleware(app, metrics=metrics)
    for method, path in (("GET", "/v1/domains/g1"), ("BREW", "/a/b/c"), ("GET", "/v1/events")):
        asyncio.run(mw({"type": "http", "method": method, "path": path}, receive, send))
    text = metrics.render().decode()
    assert 'route="/v1/domains/{name}"' in text
    assert 'method="other",route="other",status="404"' in text
    assert "/a/b/c" not in text and "BREW" not in text
    assert "/v1/events" not in text  # a stream's length is no latency


def test_domains_and_qemu_processes_are_counted_when_scraped() -> None:
    metrics = Metrics()
    doms = [
        SimpleNamespace(state="running", process=object(), job=_Job(AsyncJob.MIGRATION_OUT)),
        SimpleNamespace(state="shutoff", process=None, job=_Job(AsyncJob.NONE)),
    ]
    metrics.domains = lambda: iter(doms)
    text = metrics.render().decode()
    assert 'vmferry_domains{state="running"} 1.0' in text
    assert 'vmferry_domains{state="paused"} 0.0' in text
    assert "vmferry_qemu_processes 1.0" in text
    assert 'vmferry_migrations_active{side="source"} 1.0' in text


# -- the migration observer ----------------------------------------------------------------------


class _Job:
    def __init__(self, active: AsyncJob) -> None:
        self.async_job = active

    def is_active(self, job: AsyncJob) -> bool:
        return self.async_job is job


def _dom(mid: str = "") -> Any:
    return SimpleNamespace(
        name="g1",
        uuid="u1",
        job=_Job(AsyncJob.NONE),
        migration=SimpleNamespace(params=MigrationParams(migration_id=mid), flags=0),
        completed_job=None,
    )


def _run(observer: MigrationObserver, dom: Any, phase: str, **kw: Any) -> None:
    with observer.step("source", phase, cast(QemuDomain, dom), **kw):
        if phase == "begin":
            dom.job.async_job = AsyncJob.MIGRATION_OUT
        if phase == "confirm":
            dom.job.async_job = AsyncJob.NONE
            dom.completed_job = {"data_processed": 4096, "downtime_ms": 30, "guest_downtime_ms": 45}


def test_a_completed_migration_is_counted_once_with_its_steps(captured: io.StringIO) -> None:
    observer, dom = MigrationObserver(), _dom("mig-7")
    observer.metrics = Metrics()
    logs.bind_migration("mig-7")
    _run(observer, dom, "begin", flags=int(MigrateFlags.LIVE), first=True)
    _run(observer, dom, "perform")
    text = observer.metrics.render().decode()
    assert "vmferry_migrations_total{" not in text  # not over yet
    _run(observer, dom, "confirm", final=True)
    text = observer.metrics.render().decode()
    assert 'vmferry_migrations_total{mode="live",result="completed",side="source"} 1.0' in text
    assert 'vmferry_migration_bytes_total{side="source"} 4096.0' in text
    assert 'vmferry_migration_downtime_seconds_sum{kind="guest",side="source"} 0.045' in text
    assert set(dom.completed_job["source_phases_ms"]) == {"begin", "perform", "confirm"}
    assert dom.completed_job["migration_id"] == "mig-7"
    assert all(x.get("migration_id") == "mig-7" for x in _lines(captured))


def test_a_refused_begin_counts_a_failure_and_leaves_the_running_migration_alone() -> None:
    observer, dom = MigrationObserver(), _dom()
    observer.metrics = Metrics()
    dom.job.async_job = AsyncJob.MIGRATION_OUT  # another migration runs
    with (
        pytest.raises(VmferryError),
        observer.step("source", "begin", dom, flags=0, first=True),
    ):
        raise VmferryError(ErrorCode.OPERATION_INVALID, "another migration job")
    text = observer.metrics.render().decode()
    assert 'vmferry_migrations_total{mode="paused",result="failed",side="source"} 1.0' in text
    with (
        pytest.raises(VmferryError),
        observer.step("source", "perform", dom),
    ):
        dom.job.async_job = AsyncJob.NONE
        raise VmferryError(ErrorCode.OPERATION_ABORTED, "aborted by the user")
    text = observer.metrics.render().decode()
    assert 'result="aborted"' in text


def test_mode_labels() -> None:
    assert mode_of(int(MigrateFlags.LIVE)) == "live"
    assert mode_of(int(MigrateFlags.LIVE | MigrateFlags.POSTCOPY)) == "postcopy"
    assert mode_of(int(MigrateFlags.OFFLINE | MigrateFlags.PERSIST_DEST)) == "offline"
    assert mode_of(0) == "paused"


# -- vmferry metrics ---------------------------------------------------------------------------


def test_summary_of_the_exposition_text() -> None:
    observer, dom = MigrationObserver(), _dom("m")
    metrics = observer.metrics = Metrics()
    _run(observer, dom, "begin", flags=int(MigrateFlags.LIVE), first=True)
    _run(observer, dom, "confirm", final=True)
    metrics.job_waited("modify", 0.5)
    metrics.domains = lambda: iter([SimpleNamespace(state="running", process=1, job=dom.job)])
    summary = summarize(metrics.render().decode())
    assert summary["migrations"] == [
        {"side": "source", "mode": "live", "result": "completed", "count": 1}
    ]
    assert summary["qemu_processes"] == 1 and summary["domains"]["running"] == 1
    assert {"job": "modify", "count": 1, "mean_ms": 500.0} in summary["job_waits"]
    assert summary["migration_bytes"] == {"source": 4096}
    table = render(summary)
    assert "  source       live      completed  1" in table
    assert "Domains:            running 1" in table


def test_tasks_started_detached_do_not_carry_the_migration_id() -> None:
    seen: list[str] = []

    async def long_lived() -> None:
        seen.append(logs.current_migration())

    async def main() -> None:
        logs.bind_migration("m1")
        with logs.detached():
            task = asyncio.create_task(long_lived())  # e.g. a QEMU monitor's reader
        seen.append(logs.current_migration())
        await task

    asyncio.run(main())
    assert seen == ["m1", ""]


# -- the policy's report in the cookie ----------------------------------------------------------


def _cookie_with(policy: dict[str, Any]) -> Any:
    from vmferry.migration.cookie import MigrationCookie

    return MigrationCookie(
        name="g1",
        uuid="3f0e8a4e-8f5e-4a53-9b3e-2a8d3c9c6a11",
        hostname="a",
        hostuuid="11111111-1111-4111-8111-111111111111",
        policy=policy,
    )


def _parsed(xml: str) -> Any:
    from vmferry.migration.cookie import parse_cookie

    return parse_cookie(
        xml,
        name="g1",
        uuid="3f0e8a4e-8f5e-4a53-9b3e-2a8d3c9c6a11",
        local_hostuuid="22222222-2222-4222-8222-222222222222",
    )


def test_the_policy_report_travels_in_the_cookie() -> None:
    stats = {
        "policy": "vmferry",
        "policy_downtime_target_ms": 300,
        "policy_actions": [{"t_s": 0.1, "iteration": 1, "action": "downtime", "value": 300}],
        "data_processed": 5,  # not the policy's: QEMU's figures travel as <statistics>
        "policy_nested": {"no": "objects"},
    }
    cookie = _parsed(_cookie_with(stats).to_xml())
    assert cookie.policy == {
        "policy": "vmferry",
        "policy_downtime_target_ms": 300,
        "policy_actions": [{"t_s": 0.1, "iteration": 1, "action": "downtime", "value": 300}],
    }
    assert _parsed(_cookie_with({}).to_xml()).policy == {}


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"policy_actions": "x"}', '{"policy": "' + "a" * 70000 + '"}'],
)
def test_a_malformed_policy_report_is_dropped(text: str) -> None:
    from xml.sax.saxutils import escape

    xml = (
        _cookie_with({})
        .to_xml()
        .replace(
            "</qemu-migration>", f"<vmferry-policy>{escape(text)}</vmferry-policy></qemu-migration>"
        )
    )
    assert _parsed(xml).policy == {}


# -- what the CLI shows ------------------------------------------------------------------------


def test_verbose_lines_show_the_id_each_steps_time_and_new_policy_actions() -> None:
    from vmferry.cli.progress import LineProgress

    stream = io.StringIO()
    view = LineProgress(stream)
    view.start("m-42")
    view("begin", None)
    view("perform", None)
    action = {"t_s": 0.5, "iteration": 1, "action": "downtime", "value": 300, "reason": "target"}
    stats = {"data_total": 100, "data_remaining": 50, "policy_actions": [action]}
    view("perform", stats)  # the progress callback gets the job's stats (a dict)
    view("perform", stats)  # the same action: once
    later = {**action, "t_s": 2.0, "action": "throttle", "value": 40}
    view.finish({"policy_actions": [action, later]})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Migration id: m-42"
    assert lines[1] == "Migration: begin"
    assert re.fullmatch(r"Migration: begin took \d+ ms", lines[2])
    actions = [x for x in lines if "policy action" in x]
    assert actions == [
        "Migration: policy action t=0.5s it=1 downtime 300 (target)",
        "Migration: policy action t=2.0s it=1 throttle 40 (target)",
    ]
    assert re.fullmatch(r"Migration: perform took \d+ ms", lines[-2])


def test_domjobinfo_completed_shows_id_steps_and_guest_downtime() -> None:
    from vmferry.api.models import JobStats
    from vmferry.cli.migrate_cmds import job_info

    stats = {
        "migration_id": "m-42",
        "downtime_ms": 30,
        "guest_downtime_ms": 41,
        "destination_phases_ms": {"prepare": 410.4, "finish": 26.2},
    }
    text = job_info(JobStats(type="completed", stats=stats))
    assert "Migration id:      m-42" in text
    assert re.search(r"^Guest downtime: +41 +ms$", text, re.M)
    assert re.search(r"^Destination steps: prepare 410 ms, finish 26 ms$", text, re.M)
