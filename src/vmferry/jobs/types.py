"""Job types and the masks that say which jobs may run beside an async job.

A domain runs at most one *sync* job (a short API call such as ``start`` or a
query) and at most one *async* job (a long operation such as a migration that
spans several API calls).  While an async job is active, only the sync jobs in
its mask may start; :attr:`Job.DESTROY` is always allowed so that a domain can
be killed whatever it is doing.  This is libvirt's ``virDomainJob`` /
``virDomainAsyncJob`` with ``JOB_MASK`` bit sets replaced by frozensets.
"""

from __future__ import annotations

from enum import StrEnum


class Job(StrEnum):
    """A sync job; the values are the names libvirt persists."""

    NONE = "none"
    #: read-only look at the domain
    QUERY = "query"
    #: kill the domain; never masked out
    DESTROY = "destroy"
    #: stop the vCPUs
    SUSPEND = "suspend"
    #: any other state change
    MODIFY = "modify"
    #: abort the running async job
    ABORT = "abort"
    #: tune an outgoing migration (speed, downtime, switch to post-copy)
    MIGRATION_OP = "migration operation"
    #: internal event handling that is safe while migrating
    MODIFY_MIGRATION_SAFE = "modify migration safe"


class AsyncJob(StrEnum):
    """An async job; the values are the names libvirt persists."""

    NONE = "none"
    MIGRATION_OUT = "migration out"
    MIGRATION_IN = "migration in"
    SAVE = "save"
    SNAPSHOT = "snapshot"


#: The async jobs that are migrations (one of them per domain at a time).
MIGRATION_JOBS: frozenset[AsyncJob] = frozenset({AsyncJob.MIGRATION_OUT, AsyncJob.MIGRATION_IN})

#: Sync jobs every async job allows unless it says otherwise (``VIR_JOB_DEFAULT_MASK``).
DEFAULT_JOB_MASK: frozenset[Job] = frozenset({Job.QUERY, Job.DESTROY, Job.ABORT})

#: Sync jobs allowed while each async job runs.  No async job allows everything.
ASYNC_JOB_MASK: dict[AsyncJob, frozenset[Job]] = {
    AsyncJob.NONE: frozenset(Job) - {Job.NONE},
    AsyncJob.MIGRATION_OUT: DEFAULT_JOB_MASK
    | {Job.SUSPEND, Job.MIGRATION_OP, Job.MODIFY_MIGRATION_SAFE},
    # The destination QEMU cannot answer queries while it loads the incoming state.
    AsyncJob.MIGRATION_IN: frozenset({Job.DESTROY, Job.MODIFY_MIGRATION_SAFE}),
    AsyncJob.SAVE: DEFAULT_JOB_MASK,
    AsyncJob.SNAPSHOT: DEFAULT_JOB_MASK,
}

#: Masks of an async job picked up again after a daemon restart
#: (``qemuProcessRestoreMigrationJob``): nobody drives the migration any more, so
#: suspending the guest underneath the recovery is not allowed.
RESTORED_ASYNC_JOB_MASK: dict[AsyncJob, frozenset[Job]] = {
    **ASYNC_JOB_MASK,
    AsyncJob.MIGRATION_OUT: DEFAULT_JOB_MASK | {Job.MIGRATION_OP, Job.MODIFY_MIGRATION_SAFE},
}


def job_allowed(async_job: AsyncJob, job: Job, mask: frozenset[Job] | None = None) -> bool:
    """Whether *job* may start while *async_job* runs (with *mask*, default its usual mask)."""
    if job is Job.DESTROY:
        return True
    return job in (ASYNC_JOB_MASK[async_job] if mask is None else mask)
