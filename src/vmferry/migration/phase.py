"""Migration phases, persisted with the job (libvirt's qemuMigrationJobPhase).

A phase names the step a side is in; after a daemon restart the phase alone
decides how the interrupted migration is resolved (see ``recovery``). Phases
move forward only; post-copy resume phases may fall back to POSTCOPY_FAILED so
a failed resume can be retried.
"""

from __future__ import annotations

from vmferry.jobs.phase import JobPhase


class MigrationPhase(JobPhase):
    NONE = 0
    # source, protocol v2
    PERFORM2 = 1
    # source, protocol v3
    BEGIN3 = 2
    PERFORM3 = 3
    PERFORM3_DONE = 4
    CONFIRM3_CANCELLED = 5
    CONFIRM3 = 6
    # destination, both protocols
    PREPARE = 7
    FINISH2 = 8
    FINISH3 = 9
    # post-copy broke after the switchover; every phase from here on is a resume phase
    POSTCOPY_FAILED = 10
    BEGIN_RESUME = 11
    PERFORM_RESUME = 12
    CONFIRM_RESUME = 13
    PREPARE_RESUME = 14
    FINISH_RESUME = 15

    @property
    def is_resume(self) -> bool:
        return self >= MigrationPhase.POSTCOPY_FAILED

    def may_move_to(self, new: JobPhase) -> bool:
        if self.is_resume and isinstance(new, MigrationPhase) and new.is_resume:
            return True
        return new >= self
