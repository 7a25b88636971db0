"""Will pre-copy converge? A model of how a guest dirties memory, and what follows from it.

Pure functions on plain numbers, so they can be tested with synthetic figures.

A guest that writes *D* bytes/s to random pages of a working set of *W* bytes
has ``f(t) = W (1 - exp(-D t / W))`` distinct bytes dirty after *t* seconds:
``D t`` while *t* is short, never more than *W*. Every pre-copy pass sends
what the previous one left dirty, at *B* bytes/s, so from *R* bytes left::

    R' = f(R / B)

and QEMU stops the guest for the last copy once ``R <= B x downtime-limit``.
Each pass yields one sample ``(pass seconds, bytes dirty at its end)``; a
dirty-rate measurement over a window yields another. :func:`fit` recovers
``D`` and ``W`` from such samples, :func:`predict` runs the passes forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Passes simulated before a migration is called non-converging.
MAX_PASSES = 100
# A pass that leaves at least this share of what it started with makes no progress.
_STALL = 0.98


@dataclass(frozen=True)
class DirtyModel:
    """How fast a guest dirties memory."""

    rate_bps: float  # D: bytes/s while few pages are dirty yet
    working_set: float  # W: bytes; math.inf when unbounded

    def dirtied(self, seconds: float) -> float:
        """Distinct bytes dirty *seconds* after a pass started."""
        if self.rate_bps <= 0 or seconds <= 0:
            return 0.0
        if math.isinf(self.working_set):
            return self.rate_bps * seconds
        return self.working_set * -math.expm1(-self.rate_bps * seconds / self.working_set)

    def throttled(self, factor: float) -> DirtyModel:
        """The guest with its vCPUs running *factor* as fast (a CPU-bound guest slows alike)."""
        return DirtyModel(self.rate_bps * max(0.0, factor), self.working_set)


@dataclass(frozen=True)
class Prediction:
    """What pre-copy will do from here on."""

    converges: bool
    passes: int  # further passes before the switchover
    eta_s: float  # seconds until the migration completes (math.inf when it does not)
    downtime_s: float  # the switchover's stop-and-copy, as predicted
    #: The downtime limit with which pre-copy would end: the bytes it stalls at / B.
    needed_downtime_s: float


def predict(
    remaining: float, bandwidth_bps: float, model: DirtyModel, downtime_limit_s: float
) -> Prediction:
    """
    Run the pre-copy passes forward from *remaining* bytes left to send.

    :param bandwidth_bps: Bytes/s the migration moves.
    :param downtime_limit_s: QEMU's downtime limit.
    """
    if bandwidth_bps <= 0:
        return Prediction(False, 0, math.inf, math.inf, math.inf)
    threshold = bandwidth_bps * downtime_limit_s
    left, eta = max(0.0, remaining), 0.0
    for passes in range(MAX_PASSES + 1):
        if left <= threshold:
            last = left / bandwidth_bps
            return Prediction(True, passes, eta + last, last, last)
        seconds = left / bandwidth_bps
        after = model.dirtied(seconds)
        if after >= left * _STALL:
            level = _stall_level(left, bandwidth_bps, model)
            if level > threshold:
                return Prediction(False, passes, math.inf, math.inf, level / bandwidth_bps)
            # crawling towards a level under the threshold: it does get there, slowly
            after = min(after, left * _STALL)
        eta += seconds
        left = after
    return Prediction(False, MAX_PASSES, math.inf, math.inf, left / bandwidth_bps)


def _stall_level(left: float, bandwidth_bps: float, model: DirtyModel) -> float:
    """Where the passes settle: the fixed point of R = f(R / B); *left* if they only grow."""
    if math.isinf(model.working_set):
        return left
    level = left
    for _ in range(200):
        nxt = model.dirtied(level / bandwidth_bps)
        if abs(nxt - level) <= level * 1e-4:
            return max(nxt, level)
        level = nxt
    return level


def fit(
    samples: Sequence[tuple[float, float]],
    *,
    memory_bytes: float,
    working_set_hint: float = math.inf,
) -> DirtyModel | None:
    """
    The model that best explains *samples* of ``(seconds, distinct bytes dirtied)``.

    Samples of one duration cannot tell a fast writer on a small working set
    from a slow one on a large set: they get *working_set_hint* (known from
    earlier samples), else the large-set (linear) reading; samples over
    different durations separate the two. None without any sample.
    """
    good = [(t, x) for t, x in samples if t > 0 and x >= 0]
    if not good:
        return None
    top = max(x for _, x in good)
    if top <= 0:
        return DirtyModel(0.0, math.inf)
    if max(t for t, _ in good) < 1.25 * min(t for t, _ in good):
        ws = working_set_hint if working_set_hint > top else math.inf
        return DirtyModel(_rate_for(good, ws), ws)
    # A coarse grid over (working set, rate) in log space, then a finer one around the best.
    lo_ws, hi_ws = math.log(top), math.log(max(memory_bytes, top * 1.01))
    rates = [x / t for t, x in good if x > 0]
    lo_d, hi_d = math.log(min(rates)), math.log(max(rates) * 64)
    best = _grid(good, lo_ws, hi_ws, lo_d, hi_d, 24)
    for _ in range(2):
        _, model = best
        step_ws, step_d = (hi_ws - lo_ws) / 24, (hi_d - lo_d) / 24
        lw, ld = math.log(model.working_set), math.log(model.rate_bps)
        lo_ws, hi_ws = max(math.log(top), lw - step_ws), lw + step_ws
        lo_d, hi_d = ld - step_d, ld + step_d
        best = min(best, _grid(good, lo_ws, hi_ws, lo_d, hi_d, 24), key=lambda b: b[0])
    linear = DirtyModel(_rate_for(good, math.inf), math.inf)
    if _error(good, linear) <= best[0] + 1e-9:
        return linear
    return best[1]


def _grid(
    samples: Sequence[tuple[float, float]],
    lo_ws: float,
    hi_ws: float,
    lo_d: float,
    hi_d: float,
    count: int,
) -> tuple[float, DirtyModel]:
    best: tuple[float, DirtyModel] | None = None
    for i in range(count + 1):
        ws = math.exp(lo_ws + (hi_ws - lo_ws) * i / count)
        for j in range(count + 1):
            model = DirtyModel(math.exp(lo_d + (hi_d - lo_d) * j / count), ws)
            err = _error(samples, model)
            if best is None or err < best[0]:
                best = (err, model)
    assert best is not None
    return best


def _error(samples: Sequence[tuple[float, float]], model: DirtyModel) -> float:
    return sum(math.log((model.dirtied(t) + 4096) / (x + 4096)) ** 2 for t, x in samples)


def _rate_for(samples: Sequence[tuple[float, float]], ws: float) -> float:
    """The dirty rate each sample implies for working set *ws*, their geometric mean."""
    logs = []
    for t, x in samples:
        if math.isinf(ws):
            rate = x / t
        else:
            rate = -ws / t * math.log1p(-min(x, ws * 0.999) / ws)
        logs.append(math.log(max(rate, 1.0)))
    return math.exp(sum(logs) / len(logs))
