"""The job model: sync jobs, async-job masks, phases, ownership, persistence, waiters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vmferry.api.models import JobInfo
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import (
    ASYNC_JOB_MASK,
    DEFAULT_JOB_MASK,
    RESTORED_ASYNC_JOB_MASK,
    AsyncJob,
    DomainJob,
    Job,
    JobPhase,
    job_allowed,
)

TIMEOUT = 0.2


class Phase(JobPhase):
    """A small migration-like phase enum; resume phases may fall back to FAILED."""

    NONE = 0
    BEGIN3 = 1
    PERFORM3 = 2
    PERFORM3_DONE = 3
    CONFIRM3 = 4
    PREPARE = 5
    FINISH3 = 6
    FAILED = 10
    RESUME = 11

    def may_move_to(self, new: JobPhase) -> bool:
        if self >= Phase.FAILED and new >= Phase.FAILED:
            return True
        return super().may_move_to(new)


class OtherPhase(JobPhase):
    NONE = 0
    DUMPING = 1


def make(**kwargs: Any) -> DomainJob:
    return DomainJob("vm1", wait_timeout=kwargs.pop("wait_timeout", TIMEOUT), **kwargs)


async def until(cond: Callable[[], bool], limit: float = 2.0) -> None:
    """Let other tasks run until *cond* holds."""
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def quick(aw: Awaitable[None]) -> None:
    """*aw* must finish without waiting for a wake-up or the job timeout."""
    await asyncio.wait_for(aw, TIMEOUT / 4)


# Read through functions: mypy would keep a property narrowed across calls that change it.
def phase_of(job: DomainJob) -> JobPhase | None:
    return job.phase


def async_of(job: DomainJob) -> AsyncJob:
    return job.async_job


def sync_of(job: DomainJob) -> Job:
    return job.job


async def hold(job: DomainJob, kind: Job, api: str) -> None:
    """Take *kind* for *api* in another task (as a concurrent API call would)."""
    await asyncio.create_task(job.begin(kind, api))


async def timeout_error(aw: Awaitable[None]) -> VmferryError:
    with pytest.raises(VmferryError) as info:
        await aw
    assert info.value.code == ErrorCode.OPERATION_TIMEOUT
    return info.value


# -- types and masks ---------------------------------------------------------------------------


def test_masks_follow_libvirt() -> None:
    assert DEFAULT_JOB_MASK == {Job.QUERY, Job.DESTROY, Job.ABORT}
    assert ASYNC_JOB_MASK[AsyncJob.MIGRATION_OUT] == {
        Job.QUERY, Job.DESTROY, Job.ABORT, Job.SUSPEND, Job.MIGRATION_OP,
        Job.MODIFY_MIGRATION_SAFE,
    }  # fmt: skip
    assert ASYNC_JOB_MASK[AsyncJob.MIGRATION_IN] == {Job.DESTROY, Job.MODIFY_MIGRATION_SAFE}
    assert Job.SUSPEND not in RESTORED_ASYNC_JOB_MASK[AsyncJob.MIGRATION_OUT]
    assert set(ASYNC_JOB_MASK) == set(AsyncJob)
    for async_job in AsyncJob:
        assert job_allowed(async_job, Job.DESTROY)
        assert job_allowed(async_job, Job.DESTROY, frozenset())
    assert not job_allowed(AsyncJob.MIGRATION_IN, Job.QUERY)
    assert job_allowed(AsyncJob.NONE, Job.MODIFY)
    assert str(Job.MIGRATION_OP) == "migration operation"
    assert str(AsyncJob.MIGRATION_OUT) == "migration out"


def test_phase_labels_and_order() -> None:
    assert Phase.PERFORM3_DONE.label == "perform3_done"
    assert Phase.from_label("perform3") is Phase.PERFORM3
    with pytest.raises(VmferryError) as info:
        Phase.from_label("bogus")
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    assert Phase.BEGIN3.may_move_to(Phase.PERFORM3)
    assert Phase.BEGIN3.may_move_to(Phase.BEGIN3)
    assert not Phase.PERFORM3.may_move_to(Phase.BEGIN3)
    assert Phase.RESUME.may_move_to(Phase.FAILED)


# -- sync jobs ---------------------------------------------------------------------------------


async def test_sync_jobs_serialize() -> None:
    job = make()
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with job.acquire(Job.MODIFY, "start"):
            order.append("first in")
            await release.wait()
            order.append("first out")

    async def second() -> None:
        async with job.acquire(Job.MODIFY, "shutdown"):
            order.append("second in")
            assert job.job_api == "shutdown"

    t1 = asyncio.create_task(first())
    await until(lambda: job.job is Job.MODIFY)
    t2 = asyncio.create_task(second())
    await until(lambda: job.waiting == 1)
    assert job.job_api == "start"
    assert order == ["first in"]
    release.set()
    await asyncio.gather(t1, t2)
    assert order == ["first in", "first out", "second in"]
    assert job.job is Job.NONE and job.job_api == "" and job.waiting == 0


async def test_sync_timeout_names_holder_and_domain() -> None:
    job = make()
    await hold(job, Job.MODIFY, "start")
    t0 = time.monotonic()
    err = await timeout_error(job.begin(Job.QUERY, "dominfo"))
    elapsed = time.monotonic() - t0
    assert TIMEOUT <= elapsed < TIMEOUT + 1.0
    assert "cannot acquire state change lock (held by monitor=start)" in err.message
    assert "'vm1'" in err.message and "dominfo" in err.message
    assert job.job is Job.MODIFY and job.job_api == "start" and job.waiting == 0
    job.end()
    await quick(job.begin(Job.QUERY, "dominfo"))


async def test_wait_timeout_is_configurable() -> None:
    assert DomainJob("x").wait_timeout == 30.0
    job = make(wait_timeout=0.05)
    await hold(job, Job.MODIFY, "start")
    t0 = time.monotonic()
    await timeout_error(job.begin(Job.MODIFY, "stop"))
    assert time.monotonic() - t0 < TIMEOUT
    job.wait_timeout = 0.3
    t0 = time.monotonic()
    await timeout_error(job.begin(Job.MODIFY, "stop"))
    assert time.monotonic() - t0 >= 0.3


async def test_acquire_releases_on_error_and_end_checks() -> None:
    job = make()
    with pytest.raises(RuntimeError):
        async with job.acquire(Job.MODIFY, "start"):
            raise RuntimeError("boom")
    assert job.job is Job.NONE
    with pytest.raises(VmferryError) as info:
        job.end()
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    with pytest.raises(VmferryError):
        await job.begin(Job.NONE, "nothing")


async def test_nested_job_in_same_task_fails_at_once() -> None:
    job = make(wait_timeout=5.0)
    async with job.acquire(Job.MODIFY, "start"):
        t0 = time.monotonic()
        with pytest.raises(VmferryError) as info:
            await job.begin(Job.QUERY, "dominfo")
        assert info.value.code == ErrorCode.INTERNAL_ERROR
        assert "still holds job 'modify'" in info.value.message
        with pytest.raises(VmferryError):
            await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
        assert time.monotonic() - t0 < 1.0
    assert job.async_job is AsyncJob.NONE


# -- masks while an async job runs -------------------------------------------------------------


async def test_migration_out_allows_its_mask_and_blocks_modify() -> None:
    job = make()
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    for allowed in (Job.QUERY, Job.ABORT, Job.SUSPEND, Job.MIGRATION_OP,
                    Job.MODIFY_MIGRATION_SAFE, Job.DESTROY):  # fmt: skip
        await quick(job.begin(allowed, f"api-{allowed}"))
        assert job.job is allowed
        job.end()
    err = await timeout_error(job.begin(Job.MODIFY, "start"))
    assert "cannot acquire state change lock (held by monitor=migrate-begin)" in err.message
    assert "'migration out'" in err.message and "vm1" in err.message
    # Between API calls nobody owns the job; the message names the job instead.
    job.continue_()
    err = await timeout_error(job.begin(Job.MODIFY, "start"))
    assert (
        "held by async job 'migration out' (phase begin3, started by migrate-begin)" in err.message
    )
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    job.continue_()
    err = await timeout_error(job.begin(Job.MODIFY, "resume"))
    assert "phase perform3, started by migrate-begin, last handled by migrate-perform" in (
        err.message
    )
    assert job.job is Job.NONE


async def test_masked_job_starts_when_async_job_finishes() -> None:
    job = make(wait_timeout=5.0)
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    waiter = asyncio.create_task(job.begin(Job.MODIFY, "start"))
    await until(lambda: job.waiting == 1)
    job.set_phase(Phase.PERFORM3)  # a wake-up that does not make it ready
    await asyncio.sleep(0.01)
    assert not waiter.done()
    job.finish_async()
    await quick(waiter)
    assert job.job is Job.MODIFY and job.job_api == "start"


async def test_migration_in_blocks_queries_but_not_destroy() -> None:
    job = make()
    await job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", Phase.PREPARE)
    err = await timeout_error(job.begin(Job.QUERY, "dominfo"))
    assert "held by monitor=migrate-prepare" in err.message
    await timeout_error(job.begin(Job.ABORT, "abort"))
    await quick(job.begin(Job.MODIFY_MIGRATION_SAFE, "event"))
    job.end()
    await quick(job.begin(Job.DESTROY, "destroy"))
    assert job.job is Job.DESTROY
    job.end()


async def test_destroy_waits_for_sync_job_only() -> None:
    job = make()
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-perform", Phase.PERFORM3)
    await hold(job, Job.QUERY, "jobinfo")
    destroy = asyncio.create_task(job.begin(Job.DESTROY, "destroy"))
    await until(lambda: job.waiting == 1)
    job.end()
    await quick(destroy)
    assert job.job is Job.DESTROY and job.async_job is AsyncJob.MIGRATION_OUT
    job.end()
    # A sync job that never ends makes destroy time out, naming that job.
    await hold(job, Job.QUERY, "jobinfo")
    err = await timeout_error(job.begin(Job.DESTROY, "destroy"))
    assert "held by monitor=jobinfo" in err.message


# -- starting async jobs and phases ------------------------------------------------------------


async def test_second_async_job_is_refused() -> None:
    job = make()
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    job.continue_()
    for async_job in (AsyncJob.MIGRATION_OUT, AsyncJob.MIGRATION_IN):
        with pytest.raises(VmferryError) as info:
            await job.start_async(async_job, "migrate-prepare", Phase.PREPARE)
        assert info.value.code == ErrorCode.OPERATION_INVALID
        assert "another migration job is already running for domain 'vm1'" in (info.value.message)
    assert job.phase is Phase.BEGIN3 and job.async_last_api == "migrate-begin"


async def test_start_async_waits_for_sync_job_and_one_racer_wins() -> None:
    job = make(wait_timeout=5.0)
    await job.begin(Job.MODIFY, "start")
    out = asyncio.create_task(job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin",
                                              Phase.BEGIN3))  # fmt: skip
    inc = asyncio.create_task(job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare",
                                              Phase.PREPARE))  # fmt: skip
    await until(lambda: job.waiting == 2)
    assert job.async_job is AsyncJob.NONE
    job.end()
    results = await asyncio.gather(out, inc, return_exceptions=True)
    errors = [r for r in results if isinstance(r, VmferryError)]
    assert len(errors) == 1 and errors[0].code == ErrorCode.OPERATION_INVALID
    assert job.async_job in (AsyncJob.MIGRATION_OUT, AsyncJob.MIGRATION_IN)
    assert job.waiting == 0 and job.job is Job.NONE


async def test_start_async_timeout_names_sync_holder() -> None:
    job = make()
    await hold(job, Job.QUERY, "dominfo")
    err = await timeout_error(
        job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    )
    assert "held by monitor=dominfo" in err.message and "migrate-begin" in err.message
    assert job.async_job is AsyncJob.NONE


async def test_start_async_sets_everything() -> None:
    job = make()
    before = time.time()
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3, flags=0x41)
    assert job.is_active(AsyncJob.MIGRATION_OUT) and not job.is_active(AsyncJob.MIGRATION_IN)
    assert job.phase is Phase.BEGIN3 and job.flags == 0x41
    assert job.owned and job.async_api == "migrate-begin" == job.async_started_by
    assert job.async_started is not None and before <= job.async_started <= time.time()
    assert job.job is Job.NONE  # the async job does not hold the sync slot
    info = JobInfo(**job.info())
    assert info.async_job == "migration out" and info.phase == "begin3"
    assert info.async_owner_api == "migrate-begin" and info.flags == 0x41
    job.finish_async()
    assert JobInfo(**job.info()) == JobInfo()
    assert not job.owned and job.phase is None and job.async_started is None


async def test_start_phase_errors() -> None:
    job = make()
    with pytest.raises(VmferryError) as info:
        job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    assert info.value.code == ErrorCode.OPERATION_INVALID
    assert info.value.message == "domain 'vm1' is not being migrated"
    with pytest.raises(VmferryError) as info:
        job.start_phase(AsyncJob.MIGRATION_IN, Phase.FINISH3, "migrate-finish")
    assert info.value.message == "domain 'vm1' is not processing incoming migration"

    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    # Wrong kind of async job.
    with pytest.raises(VmferryError) as info:
        job.start_phase(AsyncJob.MIGRATION_IN, Phase.FINISH3, "migrate-finish")
    assert "is not processing incoming migration" in info.value.message
    # Still owned by the API that started it.
    with pytest.raises(VmferryError) as info:
        job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    assert info.value.code == ErrorCode.OPERATION_INVALID
    assert "is being actively handled by API 'migrate-begin'" in info.value.message
    job.continue_()
    assert not job.owned and job.async_api == "" and job.async_last_api == "migrate-begin"
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    assert job.owned and job.async_api == "migrate-perform" and job.phase is Phase.PERFORM3


async def test_phase_going_backwards_is_refused() -> None:
    job = make()
    with pytest.raises(VmferryError):
        job.set_phase(Phase.PERFORM3)  # no async job
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    job.set_phase(Phase.PERFORM3)
    with pytest.raises(VmferryError) as info:
        job.set_phase(Phase.BEGIN3)
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    assert "migration protocol going backwards perform3 => begin3" in info.value.message
    assert job.phase is Phase.PERFORM3
    job.set_phase(Phase.PERFORM3)  # staying is fine
    job.continue_()
    with pytest.raises(VmferryError) as info:
        job.start_phase(AsyncJob.MIGRATION_OUT, Phase.BEGIN3, "migrate-begin")
    assert "going backwards perform3 => begin3" in info.value.message
    assert not job.owned  # a refused step does not take the job
    with pytest.raises(VmferryError) as info:
        job.start_phase(AsyncJob.MIGRATION_OUT, OtherPhase.DUMPING, "x")
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    # A subclass may let resume phases fall back.
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.RESUME, "migrate-perform")
    job.set_phase(Phase.FAILED)
    assert phase_of(job) is Phase.FAILED


# -- persistence hook --------------------------------------------------------------------------


async def test_on_change_runs_before_the_work_with_new_state() -> None:
    log: list[tuple[str, ...]] = []
    job = make()
    job.on_change = lambda: log.append(
        ("saved", str(job.async_job), job.info()["phase"], job.async_api)
    )

    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    log.append(("work", "begin"))
    job.continue_()
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    log.append(("work", "perform"))
    job.set_phase(Phase.PERFORM3_DONE)
    log.append(("work", "after perform"))
    async with job.acquire(Job.QUERY, "jobinfo"):  # sync jobs are not persisted
        pass
    job.finish_async()
    job.finish_async()  # no job: nothing to save
    assert log == [
        ("saved", "migration out", "begin3", "migrate-begin"),
        ("work", "begin"),
        ("saved", "migration out", "begin3", ""),
        ("saved", "migration out", "perform3", "migrate-perform"),
        ("work", "perform"),
        ("saved", "migration out", "perform3_done", "migrate-perform"),
        ("work", "after perform"),
        ("saved", "none", "none", ""),
    ]


async def test_failed_save_at_start_leaves_no_job() -> None:
    def save() -> None:
        raise OSError("disk full")

    job = make(on_change=save)
    with pytest.raises(OSError):
        await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    assert job.async_job is AsyncJob.NONE and not job.owned
    job.on_change = None
    await quick(job.begin(Job.MODIFY, "start"))


# -- continue_ and cleanup ---------------------------------------------------------------------


async def test_continue_then_run_cleanup_ends_the_job() -> None:
    saved: list[str] = []
    job = make()
    job.on_change = lambda: saved.append(str(job.async_job))
    seen: list[tuple[bool, str]] = []

    async def cleanup() -> None:
        seen.append((job.owned, job.async_api))
        with pytest.raises(VmferryError) as info:
            job.start_phase(AsyncJob.MIGRATION_IN, Phase.FINISH3, "migrate-finish")
        assert "actively handled by API 'cleanup'" in info.value.message
        await asyncio.sleep(0)

    await job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", Phase.PREPARE)
    await job.run_cleanup()  # owned: the owner deals with it
    assert job.async_job is AsyncJob.MIGRATION_IN and seen == []
    job.continue_(cleanup)
    assert job.async_job is AsyncJob.MIGRATION_IN and not job.owned
    await job.run_cleanup()
    assert seen == [(True, "cleanup")]
    assert async_of(job) is AsyncJob.NONE and not job.owned
    assert saved[-1] == "none"
    await job.run_cleanup()  # nothing left
    assert seen == [(True, "cleanup")]


async def test_cleanup_that_finishes_itself_or_fails() -> None:
    job = make()

    async def finishing() -> None:
        job.finish_async()

    async def failing() -> None:
        raise RuntimeError("port already released")

    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    job.continue_(finishing)
    await job.run_cleanup()
    assert job.async_job is AsyncJob.NONE

    await job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", Phase.PREPARE)
    job.continue_(failing)
    await job.run_cleanup()  # logged, not raised
    assert job.async_job is AsyncJob.NONE


async def test_cleanup_does_not_end_a_newer_job() -> None:
    job = make()

    async def finish_and_restart() -> None:
        job.finish_async()
        await job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", Phase.PREPARE)

    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    job.continue_(finish_and_restart)
    await job.run_cleanup()
    assert job.async_job is AsyncJob.MIGRATION_IN and job.async_api == "migrate-prepare"


async def test_continue_without_cleanup_replaces_the_old_one() -> None:
    job = make()
    called: list[str] = []

    async def cleanup() -> None:
        called.append("cleanup")

    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    job.continue_(cleanup)
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    job.continue_()
    await job.run_cleanup()
    assert called == [] and job.async_job is AsyncJob.NONE


# -- abort -------------------------------------------------------------------------------------


async def test_abort_request() -> None:
    job = make()
    with pytest.raises(VmferryError) as info:
        job.request_abort()
    assert info.value.code == ErrorCode.OPERATION_INVALID
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-perform", Phase.PERFORM3)
    waiter = asyncio.create_task(job.wait_abort())
    await asyncio.sleep(0)
    assert not job.abort_requested and not waiter.done()
    async with job.acquire(Job.ABORT, "abort"):
        job.request_abort()
    assert job.abort_requested
    await quick(waiter)
    job.finish_async()
    assert not job.abort_requested
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-perform", Phase.PERFORM3)
    assert not job.abort_requested  # a new job starts without the old request


# -- restart -----------------------------------------------------------------------------------


async def test_restore_from_status() -> None:
    old = make()
    await old.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3, flags=0x203)
    old.continue_()
    old.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    status = json.loads(json.dumps(old.to_status()))
    assert status["async_job"] == "migration out" and status["phase"] == "perform3"

    saved: list[str] = []
    job = make(on_change=lambda: saved.append("saved"))
    job.restore(status, Phase)
    assert saved == []  # restoring writes nothing
    assert job.async_job is AsyncJob.MIGRATION_OUT and job.phase is Phase.PERFORM3
    assert job.flags == 0x203 and job.async_started == old.async_started
    assert not job.owned and job.async_api == ""
    assert job.async_started_by == "migrate-begin" and job.async_last_api == "migrate-perform"
    # Restored mask: no SUSPEND, queries still fine.
    await quick(job.begin(Job.QUERY, "jobinfo"))
    job.end()
    err = await timeout_error(job.begin(Job.SUSPEND, "suspend"))
    assert "held by async job 'migration out' (phase perform3" in err.message
    # Recovery takes the job like any later step.
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.CONFIRM3, "recovery")
    assert saved == ["saved"]
    job.finish_async()
    await quick(job.begin(Job.SUSPEND, "suspend"))


async def test_restore_edge_cases() -> None:
    job = make()
    job.restore(make().to_status(), Phase)
    assert job.async_job is AsyncJob.NONE
    job.restore({}, Phase)
    assert job.async_job is AsyncJob.NONE
    for bad in ({"async_job": "teleport"}, {"async_job": "migration in", "phase": "warp"}):
        with pytest.raises(VmferryError) as info:
            job.restore(bad, Phase)
        assert info.value.code == ErrorCode.INTERNAL_ERROR and "vm1" in info.value.message
        assert job.async_job is AsyncJob.NONE
    job.restore({"async_job": "migration in", "phase": "prepare"}, Phase)
    assert job.phase is Phase.PREPARE and job.async_started is None
    with pytest.raises(VmferryError):
        job.restore({"async_job": "migration in", "phase": "prepare"}, Phase)


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelled_waiter_leaves_things_consistent() -> None:
    job = make(wait_timeout=5.0)
    await job.begin(Job.MODIFY, "start")
    waiter = asyncio.create_task(job.begin(Job.MODIFY, "shutdown"))
    starter = asyncio.create_task(
        job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    )
    await until(lambda: job.waiting == 2)
    waiter.cancel()
    starter.cancel()
    for task in (waiter, starter):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert job.waiting == 0
    assert job.job is Job.MODIFY and job.job_api == "start"
    assert job.async_job is AsyncJob.NONE
    job.end()
    assert sync_of(job) is Job.NONE
    await quick(job.begin(Job.MODIFY, "shutdown"))
    job.end()
    await quick(job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3))


async def test_cancelled_holder_releases_the_job() -> None:
    job = make(wait_timeout=5.0)
    entered = asyncio.Event()

    async def holder() -> None:
        async with job.acquire(Job.MODIFY, "start"):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(holder())
    await entered.wait()
    waiter = asyncio.create_task(job.begin(Job.MODIFY, "shutdown"))
    await until(lambda: job.waiting == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await quick(waiter)
    assert job.job_api == "shutdown"


async def test_continue_with_a_phase_is_one_change() -> None:
    changes: list[dict[str, Any]] = []
    job = DomainJob("vm1")
    job.on_change = lambda: changes.append(job.to_status())
    await job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    job.continue_()
    job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    del changes[:]
    job.continue_(phase=Phase.PERFORM3_DONE)
    assert [(c["phase"], c["owner_api"]) for c in changes] == [("perform3_done", "")]
    assert not job.owned
    with pytest.raises(VmferryError) as err:  # a phase going backwards is refused as ever
        job.continue_(phase=Phase.BEGIN3)
    assert err.value.code == ErrorCode.INTERNAL_ERROR


async def test_start_async_setup_rides_in_the_first_write() -> None:
    seen: list[tuple[str, str]] = []
    record: dict[str, str] = {}
    job = make(on_change=lambda: seen.append((str(job.async_job), record.get("disk", ""))))
    await job.start_async(
        AsyncJob.MIGRATION_IN,
        "migrate-prepare",
        Phase.PREPARE,
        setup=lambda: record.update(disk="/pool/vda.qcow2"),
    )
    # one write, and it already carries what setup recorded
    assert seen == [(str(AsyncJob.MIGRATION_IN), "/pool/vda.qcow2")]


async def test_start_async_setup_failing_starts_no_job() -> None:
    writes: list[str] = []
    job = make(on_change=lambda: writes.append("w"))

    def setup() -> None:
        raise VmferryError(ErrorCode.INVALID_ARG, "bad disk")

    with pytest.raises(VmferryError, match="bad disk"):
        await job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", Phase.PREPARE, setup=setup)
    assert job.async_job is AsyncJob.NONE and writes == []
    await quick(job.start_async(AsyncJob.MIGRATION_IN, "migrate-prepare", Phase.PREPARE))
