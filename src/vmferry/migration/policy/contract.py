"""The contract a migration runs under: what it asked for, filled in from the daemon's defaults.

A live migration that names no contract still gets one (issue 10 §2): the
source daemon's ``[migration] downtime_target_ms``, ``deadline_s`` and
``policy``. A migration that names policy ``none`` asked for QEMU's and
libvirt's behaviour: it gets no default at all (only what it gave itself).

``deadline_s = 0`` in the config means automatic: :func:`auto_deadline` from
the guest's memory size and the migration's bandwidth (its cap, else what the
engine measures once data moves), never under :data:`AUTO_DEADLINE_FLOOR_S`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.migration.params import MigrationParams
from vmferry.migration.policy.decide import Contract
from vmferry.migration.policy.spec import DEFAULT_POLICY, Policy, load_policy

#: QEMU's own downtime limit: the target when nobody names one.
DEFAULT_TARGET_MS = 300
#: The automatic deadline is never shorter than this: a small guest on a fast link must
#: still have time to throttle (a throttle step takes seconds to show).
AUTO_DEADLINE_FLOOR_S = 60.0
#: ... and otherwise this many full copies of the guest's memory at the link's speed.
AUTO_DEADLINE_PASSES = 10.0
#: The policy name that means QEMU's defaults (no default contract either).
NO_POLICY = "none"


@dataclass(frozen=True)
class ConvergenceDefaults:
    """``[migration] downtime_target_ms``, ``deadline_s`` (0: automatic), ``policy``."""

    downtime_target_ms: int = DEFAULT_TARGET_MS
    deadline_s: float = 0.0
    policy: str = DEFAULT_POLICY


@dataclass(frozen=True)
class Terms:
    """The policy and contract one migration runs under, and where they came from."""

    policy: Policy
    contract: Contract
    #: The deadline is automatic: :func:`auto_deadline` once the bandwidth is known.
    auto_deadline: bool
    #: "request" (the client named all of it), "default" (none of it) or "request+default".
    origin: str


def auto_deadline(memory_bytes: float, bandwidth_bps: float) -> float:
    """Seconds for :data:`AUTO_DEADLINE_PASSES` copies of the memory, at least the floor."""
    if bandwidth_bps <= 0:
        return AUTO_DEADLINE_FLOOR_S
    return max(AUTO_DEADLINE_FLOOR_S, AUTO_DEADLINE_PASSES * memory_bytes / bandwidth_bps)


def terms(params: MigrationParams, defaults: ConvergenceDefaults | None) -> Terms | None:
    """
    What *params* run under, with *defaults* filling what they leave out.

    None: no policy at all (QEMU's defaults, as libvirt): the request named
    policy ``none`` without a contract, or the daemon's default policy is ``none``
    and the request named nothing.

    :raise VmferryError: ``INVALID_ARG`` for an unknown or bad policy.
    """
    asked = bool(params.policy or params.downtime_target_ms or params.deadline_s)
    if defaults is None or params.policy == NO_POLICY:
        # QEMU's behaviour asked for (or no defaults at all): only the request's own contract.
        if not asked:
            return None
        target = params.downtime_target_ms or params.downtime_limit_ms or DEFAULT_TARGET_MS
        own = float(params.deadline_s) if params.deadline_s else None
        policy = load_policy(params.policy or DEFAULT_POLICY)
        return Terms(policy, Contract(int(target), own), False, "request")
    name = params.policy or defaults.policy
    if name == NO_POLICY and not params.downtime_target_ms and not params.deadline_s:
        return None
    target = (
        params.downtime_target_ms
        or params.downtime_limit_ms
        or defaults.downtime_target_ms
        or DEFAULT_TARGET_MS
    )
    deadline: float | None = float(params.deadline_s or defaults.deadline_s) or None
    auto = deadline is None
    filled = not (params.policy and params.downtime_target_ms and params.deadline_s)
    origin = ("request+default" if asked else "default") if filled else "request"
    return Terms(load_policy(name), Contract(int(target), deadline), auto, origin)
