"""The phase of an async job: an ordered enum each job kind defines for itself.

:class:`JobPhase` has no members; a layer that runs async jobs subclasses it
(the migration layer's ``MigrationPhase``)::

    class SavePhase(JobPhase):
        NONE = 0
        DUMPING = 1
        DONE = 2

The phase is persisted by name (lower case) with the job, so that a daemon
restarted in the middle of the job knows how far it got.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Self

from vmferry.errors import ErrorCode, VmferryError


class JobPhase(IntEnum):
    """Base of the phase enums; members are ordered by their value.

    Phases only move forward.  Moving backwards means two sides of a protocol
    disagree about where they are (a replayed or out-of-order API call) and is
    a protocol error: :meth:`~vmferry.jobs.DomainJob.set_phase` refuses it
    with :attr:`~vmferry.errors.ErrorCode.INTERNAL_ERROR`.  A subclass may
    widen :meth:`may_move_to`, e.g. for post-copy resume phases that fall back
    to a "failed" phase so the resume can be retried.
    """

    @property
    def label(self) -> str:
        """The persisted name: the member name in lower case (``"perform3"``)."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Self:
        """The member persisted as *label*; :class:`VmferryError` if there is none."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise VmferryError(
                ErrorCode.INTERNAL_ERROR, f"unknown {cls.__name__} '{label}'"
            ) from None

    def may_move_to(self, new: JobPhase) -> bool:
        """Whether the job may go from this phase to *new* (default: never backwards)."""
        return new >= self
