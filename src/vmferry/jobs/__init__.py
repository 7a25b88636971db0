"""The job model: sync jobs, async jobs, their masks and phases, one :class:`DomainJob` per domain.

See :mod:`vmferry.jobs.domainjob` for the locking rules.
"""

from __future__ import annotations

from vmferry.jobs.domainjob import CLEANUP_API, DomainJob
from vmferry.jobs.phase import JobPhase
from vmferry.jobs.types import (
    ASYNC_JOB_MASK,
    DEFAULT_JOB_MASK,
    MIGRATION_JOBS,
    RESTORED_ASYNC_JOB_MASK,
    AsyncJob,
    Job,
    job_allowed,
)

__all__ = [
    "ASYNC_JOB_MASK",
    "CLEANUP_API",
    "DEFAULT_JOB_MASK",
    "MIGRATION_JOBS",
    "RESTORED_ASYNC_JOB_MASK",
    "AsyncJob",
    "DomainJob",
    "Job",
    "JobPhase",
    "job_allowed",
]
