"""Which action to take now: pure functions of what the engine observed.

Actions, cheapest first, as the adaptive policy ranks them:

1. nothing: pre-copy converges within the downtime target before the deadline;
2. ``throttle``: slow the guest's vCPUs (auto-converge) until it does, still
   within the downtime target;
3. ``postcopy``: switch to post-copy (only if the migration allows it), the
   downtime stays tiny but the guest now depends on both hosts;
4. ``downtime``: raise the downtime limit beyond the target, to what the
   switchover needs (the target is missed, the deadline is met);
5. ``suspend``: stop the guest, so pre-copy has nothing left to chase;
6. ``abort``: the deadline has passed; the guest keeps running on the source.

Steps 4-6 only happen for a reason: the deadline is near, or nothing cheaper
is left (throttle at its maximum without effect, no post-copy).

Before any of 2-4, raising the downtime limit up to the target is free (it is
within the contract), and a predicted stall is not acted on while pre-copy
still closes in (:func:`hold_reason`): the fit is noisy, and a guest dirtying
about as fast as the link moves converges on its own a few passes later. The
hold ends when the passes stop shrinking or the deadline comes near.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vmferry.migration.policy.model import DirtyModel, Prediction, predict
from vmferry.migration.policy.spec import Adaptive, Step

#: Throttle levels tried, in percent.
_THROTTLE_STEP = 5
# A throttled guest is assumed to dirty this much more than its CPU share says.
_SLACK = 1.5
# Raise the limit this much above the stall level, so QEMU switches over at the next check.
_FORCE_HEADROOM = 1.3
_FORCE_EXTRA_MS = 50
#: A pass boundary that leaves at most this share of the previous one's bytes shows progress.
PROGRESS_RATIO = 0.9


@dataclass(frozen=True)
class Contract:
    """What a migration must meet."""

    downtime_target_ms: int
    deadline_s: float | None = None  # from the start of the memory transfer


@dataclass(frozen=True)
class Situation:
    """What the engine knows at one decision point."""

    elapsed_s: float
    remaining: float  # bytes left to send
    bandwidth_bps: float
    model: DirtyModel | None
    downtime_limit_ms: int
    throttle_pct: int = 0  # what QEMU applies now
    throttle_pending: bool = False  # a throttle step was asked for and QEMU has not applied it
    throttle_usable: bool = False  # auto-converge is on
    throttle_ineffective: bool = False  # the last throttle step did not slow the dirtying
    postcopy_usable: bool = False  # allowed by the flags and offered by this build
    forced: bool = False  # the downtime limit was raised beyond the target
    suspended: bool = False
    #: Bytes left at the last pass boundaries after the bulk pass, oldest first.
    pass_remaining: tuple[float, ...] = ()


@dataclass(frozen=True)
class Action:
    """One thing the engine does."""

    kind: str  # downtime | throttle | postcopy | suspend | abort
    value: float = 0.0  # ms for downtime, % for throttle
    reason: str = ""


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def needed_throttle(s: Situation, c: Contract, tune: Adaptive, time_left: float) -> int:
    """The smallest throttle (%) with which pre-copy converges in time, else the maximum."""
    if s.model is None or s.throttle_ineffective:
        return tune.throttle_max_pct
    running = 1.0 - s.throttle_pct / 100.0
    start = max(s.throttle_pct + _THROTTLE_STEP, 20)
    for pct in range(start, tune.throttle_max_pct, _THROTTLE_STEP):
        # proportional slow-down is optimistic for a guest that is not CPU-bound: keep slack
        model = s.model.throttled(_SLACK * (1.0 - pct / 100.0) / running)
        pred = predict(s.remaining, s.bandwidth_bps, model, c.downtime_target_ms / 1000.0)
        if (
            pred.converges
            and pred.passes <= 6
            and pred.eta_s * 2 + tune.throttle_react_s < time_left
        ):
            return pct
    return tune.throttle_max_pct


def choose(s: Situation, c: Contract, tune: Adaptive) -> tuple[Prediction | None, list[Action]]:
    """The adaptive policy: the prediction under the downtime target, and what to do now."""
    time_left = math.inf if c.deadline_s is None else c.deadline_s - s.elapsed_s
    if s.suspended:
        return None, _past_deadline(s, c, time_left, grace=True)
    if s.model is None or s.bandwidth_bps <= 0:
        return None, _past_deadline(s, c, time_left, grace=False)
    target_s = c.downtime_target_ms / 1000.0
    pred = predict(s.remaining, s.bandwidth_bps, s.model, target_s)
    if s.forced:
        return pred, _forced_follow_up(s, c, time_left)
    if s.downtime_limit_ms < c.downtime_target_ms:
        # free: the prediction above already assumes the target as the limit
        return pred, [Action("downtime", float(c.downtime_target_ms), "up to the downtime target")]
    if pred.converges and pred.eta_s + tune.margin_s <= time_left:
        return pred, []
    # the switchover, if it happened now: the stall level, or what is left if larger
    stall_s = max(pred.needed_downtime_s, s.remaining / s.bandwidth_bps)
    if math.isinf(stall_s):
        stall_s = s.remaining / s.bandwidth_bps
    force = Action(
        "downtime",
        min(_ms(stall_s * _FORCE_HEADROOM) + _FORCE_EXTRA_MS, 2_000_000),
        "",
    )
    if time_left <= 2 * stall_s + tune.margin_s:
        return pred, [_why(force, f"deadline in {time_left:.1f} s: switch over now")]
    if hold_reason(s, c, tune, pred):
        return pred, []
    throttle_room = s.throttle_usable and s.throttle_pct < tune.throttle_max_pct
    if throttle_room and time_left > tune.throttle_react_s + 2 * stall_s + tune.margin_s:
        if s.throttle_pending:
            return pred, []
        pct = needed_throttle(s, c, tune, time_left)
        why = (
            "the last throttle step did not slow the guest"
            if s.throttle_ineffective
            else _stall_reason(s, c, pred)
        )
        return pred, [Action("throttle", float(pct), why)]
    if s.postcopy_usable:
        return pred, [Action("postcopy", 0.0, "pre-copy cannot meet the downtime target in time")]
    if s.throttle_pending:
        return pred, []  # the last throttle step may still do it
    reason = (
        "no cheaper action left (throttle at its maximum, no post-copy)"
        if s.throttle_usable
        else "no cheaper action left (no throttle, no post-copy)"
    )
    return pred, [_why(force, reason + f": switch over with ~{stall_s * 1000:.0f} ms downtime")]


def hold_reason(s: Situation, c: Contract, tune: Adaptive, pred: Prediction) -> str:
    """
    Why a predicted stall is not acted on yet (empty: act now).

    Pre-copy still closes in when the last pass shrank what is left to at most
    :data:`PROGRESS_RATIO` of the pass before and, at that pace, reaches the
    switchover within ``tune.wait_passes`` passes; or when the stall is a near
    miss (the needed downtime within ``tune.wait_tolerance`` times the target)
    and the passes shrink, or there is no trend to judge yet (one more pass
    shows it). Never with the deadline near: then there must still be time for
    a throttle to work, and a hold costs at most a pass or two.

    :param pred: The prediction under the downtime target.
    """
    if pred.converges or s.model is None or s.bandwidth_bps <= 0:
        return ""  # a late convergence: waiting does not make it earlier
    time_left = math.inf if c.deadline_s is None else c.deadline_s - s.elapsed_s
    stall_s = max(s.remaining / s.bandwidth_bps, min(pred.needed_downtime_s, 3600.0))
    if time_left <= 2 * (tune.throttle_react_s + 2 * stall_s + tune.margin_s):
        return ""
    target_s = c.downtime_target_ms / 1000.0
    needed_ms = pred.needed_downtime_s * 1000
    near = pred.needed_downtime_s <= tune.wait_tolerance * target_s
    history = s.pass_remaining
    if len(history) < 2 or history[-2] <= 0:
        if near:
            return (
                f"pre-copy needs ~{needed_ms:.0f} ms, near the {c.downtime_target_ms} ms "
                "target: one more pass shows the trend"
            )
        return ""
    ratio = history[-1] / history[-2]
    if ratio > PROGRESS_RATIO:
        return ""  # the passes stopped shrinking: the stall is real
    threshold = s.bandwidth_bps * target_s
    passes = _passes_to(history[-1], threshold, ratio)
    shrink = f"the last pass left {ratio:.0%} of the one before"
    if passes <= tune.wait_passes:
        return f"{shrink}: ~{passes:.1f} passes to the switchover"
    if near:
        return f"{shrink}, and pre-copy needs only ~{needed_ms:.0f} ms"
    return ""


def _passes_to(left: float, threshold: float, ratio: float) -> float:
    """Passes until *left* shrinks to *threshold*, each leaving *ratio* of the last."""
    if left <= threshold:
        return 0.0
    if ratio <= 0:
        return 1.0
    return math.log(threshold / left) / math.log(ratio)


def _stall_reason(s: Situation, c: Contract, pred: Prediction) -> str:
    assert s.model is not None
    mib = 1 << 20
    if math.isinf(s.model.working_set) and s.model.rate_bps >= s.bandwidth_bps:
        return (
            f"the guest dirties {s.model.rate_bps / mib:.0f} MiB/s, "
            f"the migration moves {s.bandwidth_bps / mib:.0f} MiB/s"
        )
    if not pred.converges:
        return (
            f"pre-copy stalls at ~{pred.needed_downtime_s * 1000:.0f} ms of downtime "
            f"> target {c.downtime_target_ms} ms"
        )
    return f"pre-copy would end only in {pred.eta_s:.1f} s, after the deadline"


def _why(action: Action, reason: str) -> Action:
    return Action(action.kind, action.value, reason)


def _forced_follow_up(s: Situation, c: Contract, time_left: float) -> list[Action]:
    """After the limit was raised: suspend if the switchover still has not come at the deadline."""
    if time_left <= 0:
        return [Action("suspend", 0.0, "deadline reached and the switchover has not happened")]
    return []


def _past_deadline(s: Situation, c: Contract, time_left: float, *, grace: bool) -> list[Action]:
    if c.deadline_s is None:
        return []
    # A suspended guest only needs its last bytes sent: give that time before giving up.
    extra = 2.0 + (2 * s.remaining / s.bandwidth_bps if grace and s.bandwidth_bps > 0 else 0.0)
    if time_left + (extra if grace else 0.0) <= 0:
        return [Action("abort", 0.0, f"deadline of {c.deadline_s:g} s passed")]
    return []


def due_step(steps: tuple[Step, ...], fired: int, iterations: int, elapsed_s: float) -> Step | None:
    """The next schedule step to fire (steps fire in order, at most one per evaluation)."""
    if fired < len(steps) and steps[fired].due(iterations, elapsed_s):
        return steps[fired]
    return None
