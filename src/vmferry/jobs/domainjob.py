"""The job of one domain: who may touch it now, and how far its async job got.

:class:`DomainJob` is libvirt's ``vm->job`` with the rules of
``virDomainObjBeginJobInternal`` and the ``qemuMigrationJob*`` helpers:

* A **sync job** is one API call that reads or changes the domain.  Only one
  runs at a time; :meth:`DomainJob.begin` waits for the running one to end.
* An **async job** (a migration, a save) spans several API calls.  While it is
  active only the sync jobs in its mask may start (:data:`ASYNC_JOB_MASK`).
  The API that runs a step of it *owns* it; between steps nobody does
  (:meth:`DomainJob.continue_`) but the job and its mask stay in force, and
  the next step takes ownership again (:meth:`DomainJob.start_phase`).
* Every change of the async job, its phase or its owner calls ``on_change``
  *before* the caller goes on, so the daemon persists the new phase before
  acting on it; after a restart :meth:`DomainJob.restore` brings the job back
  from what was persisted (:meth:`DomainJob.to_status`).

Destroy
-------

:attr:`Job.DESTROY` is never masked out, so a domain can be destroyed in the
middle of a migration.  It still waits for a running *sync* job, as in
libvirt.  The async job itself never holds the sync slot (not even while its
owner API runs), so during a migration a destroy only waits for a concurrent
sync job such as a query; the driver kills QEMU *before* it asks for the
DESTROY job (libvirt's ``qemuProcessBeginStopJob``), which makes any sync job
stuck on the monitor fail and end.

Usage::

    async with dom.job.acquire(Job.MODIFY, "start"):
        ...

    await dom.job.start_async(AsyncJob.MIGRATION_OUT, "migrate-begin", Phase.BEGIN3)
    ...                     # first step
    dom.job.continue_(cleanup)
    dom.job.start_phase(AsyncJob.MIGRATION_OUT, Phase.PERFORM3, "migrate-perform")
    ...                     # next step
    dom.job.finish_async()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs.phase import JobPhase
from vmferry.jobs.types import (
    ASYNC_JOB_MASK,
    MIGRATION_JOBS,
    RESTORED_ASYNC_JOB_MASK,
    AsyncJob,
    Job,
)

log = logging.getLogger(__name__)

#: The owner API recorded while :meth:`DomainJob.run_cleanup` handles a job.
CLEANUP_API = "cleanup"


class DomainJob:
    """The sync and async job of one domain, and the rules for taking them.

    :param domain: the domain's name, for messages.
    :param wait_timeout: seconds :meth:`begin` and :meth:`start_async` wait in
        total before they give up with ``OPERATION_TIMEOUT``
        (libvirt's ``VIR_JOB_WAIT_TIME``).  Also settable afterwards.
    :param on_change: called synchronously after every change of the async
        job, its phase or its owner, before the caller continues.
    """

    def __init__(
        self,
        domain: str,
        *,
        wait_timeout: float = 30.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.domain = domain
        self.wait_timeout = wait_timeout
        self.on_change = on_change
        #: Called with (job name, seconds waited) after every wait for the job (metrics).
        self.on_wait: Callable[[str, float], None] | None = None
        # sync job
        self._job = Job.NONE
        self._job_api = ""
        self._job_since = 0.0  # monotonic
        self._job_task: asyncio.Task[Any] | None = None
        # async job
        self._async_job = AsyncJob.NONE
        self._mask = ASYNC_JOB_MASK[AsyncJob.NONE]
        self._phase: JobPhase | None = None
        self._flags = 0
        self._owned = False
        self._owner_api = ""
        self._started_by = ""
        self._last_api = ""
        self._async_started: float | None = None  # wall time
        self._cleanup: Callable[[], Awaitable[None]] | None = None
        self._generation = 0  # tells one async job from the next
        self._abort = asyncio.Event()
        # Broadcast: set and replaced on every change.  An Event rather than a
        # Condition because end(), set_phase() & co. are synchronous and could
        # not take a Condition's lock to notify; a cancelled Event.wait() leaves
        # nothing behind.
        self._changed = asyncio.Event()
        self._waiting = 0

    # -- introspection -------------------------------------------------------------------------

    @property
    def job(self) -> Job:
        """The running sync job (:attr:`Job.NONE` if none)."""
        return self._job

    @property
    def job_api(self) -> str:
        """The API that runs the sync job ("" if none)."""
        return self._job_api

    @property
    def async_job(self) -> AsyncJob:
        """The active async job (:attr:`AsyncJob.NONE` if none)."""
        return self._async_job

    @property
    def async_api(self) -> str:
        """The API that owns the async job right now; "" while ownership is released."""
        return self._owner_api

    @property
    def async_started_by(self) -> str:
        """The API that started the async job."""
        return self._started_by

    @property
    def async_last_api(self) -> str:
        """The API that owned the async job last (also after it released it)."""
        return self._last_api

    @property
    def phase(self) -> JobPhase | None:
        """The async job's phase; None when no async job is active."""
        return self._phase

    @property
    def flags(self) -> int:
        """The flags the async job was started with (e.g. migration flags)."""
        return self._flags

    @property
    def async_started(self) -> float | None:
        """When the async job started (wall time); None when none is active."""
        return self._async_started

    @property
    def owned(self) -> bool:
        """Whether an API is running a step of the async job right now."""
        return self._owned

    @property
    def mask(self) -> frozenset[Job]:
        """The sync jobs allowed now (all of them without an async job)."""
        return self._mask | {Job.DESTROY}

    @property
    def waiting(self) -> int:
        """How many callers wait in :meth:`begin` / :meth:`start_async`."""
        return self._waiting

    def allowed(self, job: Job) -> bool:
        """Whether the active async job (if any) lets *job* start."""
        return job is Job.DESTROY or job in self._mask

    def is_active(self, async_job: AsyncJob) -> bool:
        """Whether *async_job* is the active async job (libvirt's qemuMigrationJobIsActive)."""
        return async_job is not AsyncJob.NONE and self._async_job is async_job

    def info(self) -> dict[str, Any]:
        """The fields of :class:`vmferry.api.models.JobInfo`."""
        return {
            "job": str(self._job),
            "job_owner_api": self._job_api,
            "async_job": str(self._async_job),
            "phase": self._phase.label if self._phase is not None else "none",
            "async_owner_api": self._owner_api,
            "async_started": self._async_started,
            "flags": self._flags,
        }

    # -- sync jobs -----------------------------------------------------------------------------

    async def begin(self, job: Job, api: str) -> None:
        """Start sync *job* for *api*, waiting while it is not allowed or another one runs.

        :raise VmferryError: ``OPERATION_TIMEOUT`` after :attr:`wait_timeout`
            seconds, naming who holds the domain.
        """
        if job is Job.NONE:
            raise VmferryError(ErrorCode.INTERNAL_ERROR, f"API '{api}' asked for no job")
        self._refuse_nested(str(job), api)
        await self._wait_until(lambda: self.allowed(job) and self._job is Job.NONE, job, api)
        self._job = job
        self._job_api = api
        self._job_since = time.monotonic()
        self._job_task = asyncio.current_task()

    def end(self) -> None:
        """End the running sync job and wake the waiters."""
        if self._job is Job.NONE:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR, f"no job is active on domain '{self.domain}'"
            )
        self._job = Job.NONE
        self._job_api = ""
        self._job_task = None
        self._wake()

    @asynccontextmanager
    async def _acquire(self, job: Job, api: str) -> AsyncIterator[None]:
        await self.begin(job, api)
        try:
            yield
        finally:
            self.end()

    def acquire(self, job: Job, api: str) -> AbstractAsyncContextManager[None]:
        """``async with``: :meth:`begin` before the block, :meth:`end` after it."""
        return self._acquire(job, api)

    # -- async jobs ----------------------------------------------------------------------------

    async def start_async(
        self,
        async_job: AsyncJob,
        api: str,
        phase: JobPhase,
        *,
        flags: int = 0,
        setup: Callable[[], None] | None = None,
    ) -> None:
        """Start *async_job* in *phase*, owned by *api* (libvirt's qemuMigrationJobStart).

        Waits for a running sync job like :meth:`begin`. *setup* runs once the job
        is taken, before its status write: what it records rides in that write (one
        write, not two); if it raises, the job is not started.

        :raise VmferryError: ``OPERATION_INVALID`` if an async job is already
            active (also one that started while this call waited);
            ``OPERATION_TIMEOUT`` as :meth:`begin`.
        """
        if async_job is AsyncJob.NONE:
            raise VmferryError(ErrorCode.INTERNAL_ERROR, f"API '{api}' started no async job")
        self._refuse_nested(f"async job '{async_job}'", api)

        def ready() -> bool:
            if self._async_job is not AsyncJob.NONE:
                raise self._another_job(async_job)
            return self._job is Job.NONE

        await self._wait_until(ready, async_job, api)
        self._generation += 1
        self._async_job = async_job
        self._mask = ASYNC_JOB_MASK[async_job]
        self._phase = phase
        self._flags = flags
        self._owned = True
        self._owner_api = self._started_by = self._last_api = api
        self._async_started = time.time()
        self._cleanup = None
        self._abort = asyncio.Event()
        self._wake()
        try:
            if setup is not None:
                setup()
            self._changed_hook()
        except BaseException:
            # Not persisted: the caller must not go on, and nobody would end the job.
            self._reset_async()
            self._wake()
            raise

    def start_phase(self, async_job: AsyncJob, phase: JobPhase, api: str) -> None:
        """Take ownership of the active *async_job* for *api* and move it to *phase*.

        libvirt's qemuMigrationJobStartPhase: every step after the first.

        :raise VmferryError: ``OPERATION_INVALID`` if *async_job* is not active
            or another API owns it now; ``INTERNAL_ERROR`` if *phase* goes backwards.
        """
        if not self.is_active(async_job):
            raise VmferryError(ErrorCode.OPERATION_INVALID, self._not_active(async_job))
        if self._owned:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"domain '{self.domain}' is being actively handled by API "
                f"'{self._owner_api}' ({self._describe_async()})",
            )
        self._check_phase(phase)
        self._owned = True
        self._owner_api = self._last_api = api
        self._cleanup = None
        self._phase = phase
        self._wake()
        self._changed_hook()

    def set_phase(self, phase: JobPhase) -> None:
        """Move the active async job to *phase* (libvirt's qemuMigrationJobSetPhase).

        :raise VmferryError: ``INTERNAL_ERROR`` without an async job or if
            *phase* goes backwards ("migration protocol going backwards ...").
        """
        self._require_async("set the phase of")
        self._check_phase(phase)
        self._phase = phase
        self._wake()
        self._changed_hook()

    def continue_(
        self,
        cleanup: Callable[[], Awaitable[None]] | None = None,
        *,
        phase: JobPhase | None = None,
    ) -> None:
        """Release ownership between two steps; the job and its mask stay in force.

        *cleanup* runs (:meth:`run_cleanup`) if the domain's QEMU dies before the
        next step takes the job (libvirt's qemuMigrationJobContinue). *phase*:
        move to it as well, in the same change (one status write, not two).
        """
        self._require_async("release")
        if phase is not None:
            self._check_phase(phase)
            self._phase = phase
        self._owned = False
        self._owner_api = ""
        self._cleanup = cleanup
        self._wake()
        self._changed_hook()

    def finish_async(self) -> None:
        """End the async job (if any) and wake the waiters (qemuMigrationJobFinish)."""
        if self._async_job is AsyncJob.NONE:
            return
        log.debug(
            "domain %s: async job '%s' ends in phase %s",
            self.domain,
            self._async_job,
            self._phase.label if self._phase is not None else "none",
        )
        self._reset_async()
        self._wake()
        self._changed_hook()

    async def run_cleanup(self) -> None:
        """The domain's QEMU died while no API owned the async job: clean up and end it.

        Runs the callback given to :meth:`continue_` (owning the job meanwhile,
        as API ``"cleanup"``, so no step can start underneath it), then ends
        the job unless the callback did.  Does nothing while an API owns the
        job: that API sees QEMU die and handles it.  Errors of the callback
        are logged, not raised: the domain is gone either way.
        """
        if self._async_job is AsyncJob.NONE or self._owned:
            return
        generation = self._generation
        cleanup, self._cleanup = self._cleanup, None
        self._owned = True
        self._owner_api = CLEANUP_API
        try:
            if cleanup is not None:
                await cleanup()
        except Exception:
            log.exception(
                "domain %s: cleanup of async job '%s' failed", self.domain, self._async_job
            )
        finally:
            if self._generation == generation:
                self.finish_async()

    # -- abort ---------------------------------------------------------------------------------

    @property
    def abort_requested(self) -> bool:
        """Whether :meth:`request_abort` was called for the active async job."""
        return self._async_job is not AsyncJob.NONE and self._abort.is_set()

    def request_abort(self) -> None:
        """Ask the active async job to stop (the job's owner polls or awaits this).

        The caller also wakes whatever the owner is waiting on (QEMU events).

        :raise VmferryError: ``OPERATION_INVALID`` if no async job is active.
        """
        if self._async_job is AsyncJob.NONE:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID, f"no job is active on domain '{self.domain}'"
            )
        log.info("domain %s: abort of async job '%s' requested", self.domain, self._async_job)
        self._abort.set()

    async def wait_abort(self) -> None:
        """Return once an abort of the current async job is requested."""
        await self._abort.wait()

    # -- persistence ---------------------------------------------------------------------------

    def to_status(self) -> dict[str, Any]:
        """What the status file keeps of the job: the async part (sync jobs die with the daemon)."""
        return {
            "async_job": str(self._async_job),
            "phase": self._phase.label if self._phase is not None else "none",
            "flags": self._flags,
            "owner_api": self._owner_api,
            "started_by": self._started_by,
            "last_api": self._last_api,
            "started": self._async_started,
        }

    def restore(self, status: dict[str, Any], phase_type: type[JobPhase]) -> None:
        """Bring back the async job of :meth:`to_status` after a daemon restart.

        The job is active again, with the restricted mask of
        :data:`RESTORED_ASYNC_JOB_MASK` and ownership released, so the next
        step or the recovery code takes it with :meth:`start_phase`.  Does not
        call ``on_change``: the status being restored is what is on disk.

        :raise VmferryError: ``INTERNAL_ERROR`` if the status names an unknown
            job or phase, or an async job is active already.
        """
        if self._async_job is not AsyncJob.NONE:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"cannot restore the job of domain '{self.domain}': {self._describe_async()} "
                "is active",
            )
        name = str(status.get("async_job", "none"))
        try:
            async_job = AsyncJob(name)
        except ValueError:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"cannot restore the job of domain '{self.domain}': unknown async job '{name}'",
            ) from None
        if async_job is AsyncJob.NONE:
            return
        try:
            phase = phase_type.from_label(str(status.get("phase", "none")))
        except VmferryError as exc:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"cannot restore the job of domain '{self.domain}': {exc.message}",
            ) from None
        started = status.get("started")
        self._generation += 1
        self._async_job = async_job
        self._mask = RESTORED_ASYNC_JOB_MASK[async_job]
        self._phase = phase
        self._flags = int(status.get("flags", 0))
        self._owned = False
        self._owner_api = ""
        self._started_by = str(status.get("started_by", ""))
        self._last_api = str(status.get("owner_api") or status.get("last_api") or "")
        self._async_started = float(started) if started is not None else None
        self._cleanup = None
        self._abort = asyncio.Event()
        self._wake()

    # -- internals -----------------------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _changed_hook(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _reset_async(self) -> None:
        self._async_job = AsyncJob.NONE
        self._mask = ASYNC_JOB_MASK[AsyncJob.NONE]
        self._phase = None
        self._flags = 0
        self._owned = False
        self._owner_api = self._started_by = self._last_api = ""
        self._async_started = None
        self._cleanup = None

    async def _wait_until(
        self, ready: Callable[[], bool], requested: Job | AsyncJob, api: str
    ) -> None:
        """Wait until *ready()*, at most :attr:`wait_timeout` seconds in total."""
        if ready():
            if self.on_wait is not None:
                self.on_wait(str(requested), 0.0)
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        log.debug(
            "domain %s: %s for API '%s' waits (job '%s' of '%s', %s)",
            self.domain, requested, api, self._job, self._job_api, self._describe_async(),
        )  # fmt: skip
        self._waiting += 1
        try:
            async with asyncio.timeout_at(start + self.wait_timeout):
                while not ready():
                    await self._changed.wait()
        except TimeoutError:
            # The deadline may fire just after the wake-up that made us ready.
            if not ready():
                err = self._lock_error(requested, api, loop.time() - start)
                log.warning("%s", err.message)
                raise err from None
        finally:
            self._waiting -= 1
            if self.on_wait is not None:
                self.on_wait(str(requested), loop.time() - start)

    def _refuse_nested(self, what: str, api: str) -> None:
        # Waiting for a job this very task holds would only end in the timeout.
        task = asyncio.current_task()
        if self._job is not Job.NONE and task is not None and self._job_task is task:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"API '{api}' asked for {what} on domain '{self.domain}' while it still holds "
                f"job '{self._job}' (API '{self._job_api}')",
            )

    def _lock_error(self, requested: Job | AsyncJob, api: str, waited: float) -> VmferryError:
        what = f"job '{requested}'" if isinstance(requested, Job) else f"async job '{requested}'"
        if isinstance(requested, Job) and not self.allowed(requested):
            if self._owned:
                holder = f"monitor={self._owner_api}"
                detail = f"{self._describe_async()} does not allow {what}"
            else:
                holder = self._describe_async()
                detail = f"it does not allow {what} until it ends"
        elif self._job is not Job.NONE:
            holder = f"monitor={self._job_api}"
            held = time.monotonic() - self._job_since
            detail = f"job '{self._job}' has been running for {held:.1f} s"
        else:  # pragma: no cover - only reached if ready() flips without a change
            holder, detail = "unknown", "nothing holds it any more"
        return VmferryError(
            ErrorCode.OPERATION_TIMEOUT,
            f"cannot acquire state change lock (held by {holder}) for {what} of API '{api}' "
            f"on domain '{self.domain}' after {waited:.1f} s: {detail}",
        )

    def _describe_async(self) -> str:
        if self._async_job is AsyncJob.NONE:
            return "no async job"
        phase = self._phase.label if self._phase is not None else "none"
        text = f"async job '{self._async_job}' (phase {phase}"
        if self._started_by:
            text += f", started by {self._started_by}"
        if self._last_api and self._last_api != self._started_by:
            text += f", last handled by {self._last_api}"
        return text + ")"

    def _another_job(self, requested: AsyncJob) -> VmferryError:
        kind = "migration job" if {requested, self._async_job} & MIGRATION_JOBS else "async job"
        return VmferryError(
            ErrorCode.OPERATION_INVALID,
            f"another {kind} is already running for domain '{self.domain}' "
            f"({self._describe_async()})",
        )

    def _not_active(self, async_job: AsyncJob) -> str:
        if async_job is AsyncJob.MIGRATION_OUT:
            text = f"domain '{self.domain}' is not being migrated"
        elif async_job is AsyncJob.MIGRATION_IN:
            text = f"domain '{self.domain}' is not processing incoming migration"
        else:
            text = f"domain '{self.domain}' has no active '{async_job}' job"
        if self._async_job is not AsyncJob.NONE:
            text += f" (it runs {self._describe_async()})"
        return text

    def _require_async(self, action: str) -> None:
        if self._async_job is AsyncJob.NONE:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"cannot {action} the async job of domain '{self.domain}': none is active",
            )

    def _check_phase(self, new: JobPhase) -> None:
        current = self._phase
        if current is None:
            return
        if type(new) is not type(current):
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"phase {new!r} of domain '{self.domain}' is not a {type(current).__name__}",
            )
        if not current.may_move_to(new):
            protocol = (
                "migration protocol"
                if self._async_job in MIGRATION_JOBS
                else f"async job '{self._async_job}'"
            )
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR,
                f"{protocol} going backwards {current.label} => {new.label} "
                f"on domain '{self.domain}'",
            )
