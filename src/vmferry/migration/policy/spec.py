"""Convergence policies: what they say, and how they are read from TOML.

A policy is one of three kinds:

* ``none``: QEMU's defaults, nothing changed (what libvirt does). The
  migration's contract still holds: past its deadline the migration is aborted.
* ``schedule``: a list of steps, each fired once when its trigger holds
  (iterations since the start, as oVirt's convergence schedules, or seconds
  since the start, as Nova's downtime ramp).
* ``adaptive``: vmferry's own: predict whether pre-copy converges and take the
  cheapest action that meets the contract (:mod:`.decide`).

Built-in policies live as TOML files in ``<repo>/policies`` (override the
directory with ``$VMFERRY_POLICY_DIR``); a migration names one, or carries the
TOML text of its own (the CLI reads ``--policy FILE`` into the request).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.errors import ErrorCode, VmferryError

#: Environment variable naming the directory of built-in policies.
POLICY_DIR_ENV = "VMFERRY_POLICY_DIR"
# src/vmferry/migration/policy/spec.py -> repository root
_REPO_ROOT = Path(__file__).resolve().parents[4]

KINDS = ("none", "schedule", "adaptive")
ACTIONS = ("downtime", "throttle", "postcopy", "suspend", "abort")
#: QEMU's limits for ``downtime-limit`` and the CPU throttle.
MAX_DOWNTIME_MS = 2_000_000
MAX_THROTTLE_PCT = 99
#: A migration with a contract but no policy named gets this one.
DEFAULT_POLICY = "vmferry"


@dataclass(frozen=True)
class Step:
    """One step of a schedule: *action* once its trigger holds."""

    action: str
    value: float = 0.0  # downtime ms, or throttle %
    after_iteration: int | None = None  # QEMU iterations (dirty syncs) since the start
    after_s: float | None = None  # seconds since the start

    def due(self, iterations: int, elapsed_s: float) -> bool:
        if self.after_iteration is not None and iterations <= self.after_iteration:
            return False
        return not (self.after_s is not None and elapsed_s < self.after_s)


@dataclass(frozen=True)
class Adaptive:
    """Tunables of the adaptive policy."""

    #: Dirty-rate sample while the first pass runs: "auto" (when the pass is long
    #: enough to hide it), "always" or "never".
    preflight: str = "auto"
    #: Highest CPU throttle the policy asks for.
    throttle_max_pct: int = MAX_THROTTLE_PCT
    #: Seconds QEMU needs to apply a throttle step (two 1-s dirty-rate periods, then a pass).
    throttle_react_s: float = 2.5
    #: Seconds kept in hand before a deadline.
    margin_s: float = 1.0
    #: A predicted stall needing at most this many times the downtime target is a near
    #: miss: not acted on while the passes still shrink. The fit is noisy (a sampled
    #: preflight is +-20 %): a guest at 1x the link reads as anything from 300 to 520 ms
    #: for a 300 ms target, one at 2x as ~800 ms.
    wait_tolerance: float = 2.0
    #: Not acted on either while the passes shrink fast enough to reach the
    #: switchover within this many passes.
    wait_passes: float = 3.0
    #: QEMU's downtime limit (ms) until the first pass is over or the first throttle
    #: step (the target if lower; 0: the target from the start). See engine.py.
    bulk_pass_downtime_ms: int = 30


@dataclass(frozen=True)
class Policy:
    """A convergence policy."""

    name: str
    kind: str = "none"
    description: str = ""
    #: Switch QEMU's auto-converge on before the migration starts (needed to throttle).
    auto_converge: bool = False
    #: Downtime limit set before the migration starts (None: leave QEMU's).
    initial_downtime_ms: int | None = None
    #: Schedules: evaluate at most once per this many seconds, and only when the
    #: iteration count moved (VDSM's monitor thread: 10 s); 0: at every pass.
    monitor_interval_s: float = 0.0
    steps: tuple[Step, ...] = ()
    adaptive: Adaptive = field(default_factory=Adaptive)
    #: Nova's linear downtime ramp in wall-clock time, expanded per guest size.
    ramp: dict[str, float] = field(default_factory=dict)
    #: Nova's completion timeout: {"s_per_gib": ..., "action": ...}.
    timeout: dict[str, Any] = field(default_factory=dict)

    def schedule(self, memory_bytes: int) -> tuple[Step, ...]:
        """The steps for a guest of *memory_bytes*, the Nova-style ramp and timeout expanded."""
        steps = list(self.steps)
        gib = memory_bytes / (1 << 30)
        if self.ramp:
            steps = _nova_ramp(self.ramp, gib)[1:] + steps  # step 0 is the initial limit
        if self.timeout:
            data_gib = max(gib, float(self.timeout.get("min_gib", 0)))
            after = float(self.timeout["s_per_gib"]) * data_gib
            steps.append(Step(action=str(self.timeout.get("action", "abort")), after_s=after))
        return tuple(steps)

    def initial_downtime(self, memory_bytes: int) -> int | None:
        if self.ramp:
            return int(_nova_ramp(self.ramp, memory_bytes / (1 << 30))[0].value)
        return self.initial_downtime_ms


def _nova_ramp(ramp: dict[str, float], gib: float) -> list[Step]:
    """Nova's ramp: max/steps up to max in *steps* equal steps, one every delay x GiB s."""
    top = float(ramp["max_downtime_ms"])
    count = int(ramp.get("steps", 10))
    delay = float(ramp.get("delay_s_per_gib", 75)) * max(gib, float(ramp.get("min_gib", 2)))
    base = top / count
    return [
        Step(action="downtime", value=round(base + i * (top - base) / count), after_s=i * delay)
        for i in range(count + 1)
    ]


def _bad(where: str, what: str) -> VmferryError:
    return VmferryError(ErrorCode.INVALID_ARG, f"policy {where}: {what}")


def _number(table: dict[str, Any], key: str, where: str, *, lo: float = 0.0) -> float | None:
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(where, f"'{key}' must be a number")
    if value < lo:
        raise _bad(where, f"'{key}' must be >= {lo:g}")
    return float(value)


def _step(raw: Any, where: str) -> Step:
    if not isinstance(raw, dict):
        raise _bad(where, "each [[step]] must be a table")
    known = {"action", "downtime_ms", "throttle_pct", "after_iteration", "after_s"}
    if unknown := set(raw) - known:
        raise _bad(where, f"unknown key(s) in [[step]]: {', '.join(sorted(unknown))}")
    action = raw.get("action", "downtime" if "downtime_ms" in raw else "")
    if action not in ACTIONS:
        raise _bad(where, f"step action must be one of {', '.join(ACTIONS)}, not {action!r}")
    value = 0.0
    if action == "downtime":
        ms = _number(raw, "downtime_ms", where, lo=1)
        if ms is None or ms > MAX_DOWNTIME_MS:
            raise _bad(where, f"a downtime step needs downtime_ms in 1..{MAX_DOWNTIME_MS}")
        value = ms
    elif action == "throttle":
        pct = _number(raw, "throttle_pct", where, lo=1)
        if pct is None or pct > MAX_THROTTLE_PCT:
            raise _bad(where, f"a throttle step needs throttle_pct in 1..{MAX_THROTTLE_PCT}")
        value = pct
    after_it = _number(raw, "after_iteration", where)
    after_s = _number(raw, "after_s", where)
    if after_it is None and after_s is None:
        raise _bad(where, "each step needs after_iteration or after_s")
    return Step(
        action=action,
        value=value,
        after_iteration=None if after_it is None else int(after_it),
        after_s=after_s,
    )


def parse_policy(text: str, *, where: str = "<text>") -> Policy:
    """
    Read a policy from TOML.

    :raise VmferryError: ``INVALID_ARG`` naming what is wrong.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _bad(where, f"not valid TOML: {err}") from err
    known = {
        "name", "kind", "description", "auto_converge", "initial_downtime_ms",
        "monitor_interval_s", "step", "adaptive", "ramp", "timeout",
    }  # fmt: skip
    if unknown := set(raw) - known:
        raise _bad(where, f"unknown key(s): {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(where, "'name' must be a non-empty string")
    kind = raw.get("kind", "schedule")
    if kind not in KINDS:
        raise _bad(where, f"'kind' must be one of {', '.join(KINDS)}")
    steps = raw.get("step", [])
    if not isinstance(steps, list):
        raise _bad(where, "'step' must be an array of tables ([[step]])")
    initial = _number(raw, "initial_downtime_ms", where, lo=1)
    return Policy(
        name=name,
        kind=kind,
        description=str(raw.get("description", "")),
        auto_converge=bool(raw.get("auto_converge", kind == "adaptive")),
        initial_downtime_ms=None if initial is None else int(initial),
        monitor_interval_s=_number(raw, "monitor_interval_s", where) or 0.0,
        steps=tuple(_step(s, where) for s in steps),
        adaptive=_adaptive(raw.get("adaptive", {}), where),
        ramp=_ramp(raw.get("ramp", {}), where),
        timeout=_timeout(raw.get("timeout", {}), where),
    )


def _adaptive(raw: Any, where: str) -> Adaptive:
    if not isinstance(raw, dict):
        raise _bad(where, "[adaptive] must be a table")
    if unknown := set(raw) - set(Adaptive.__dataclass_fields__):
        raise _bad(where, f"unknown key(s) in [adaptive]: {', '.join(sorted(unknown))}")
    preflight = raw.get("preflight", "auto")
    if preflight not in ("auto", "always", "never"):
        raise _bad(where, "[adaptive] preflight must be auto, always or never")
    top = _number(raw, "throttle_max_pct", where, lo=1)
    if top is not None and top > MAX_THROTTLE_PCT:
        raise _bad(where, f"[adaptive] throttle_max_pct must be <= {MAX_THROTTLE_PCT}")
    bulk = _number(raw, "bulk_pass_downtime_ms", where)
    if bulk is not None and bulk > MAX_DOWNTIME_MS:
        raise _bad(where, f"[adaptive] bulk_pass_downtime_ms must be <= {MAX_DOWNTIME_MS}")
    base = Adaptive()
    return Adaptive(
        preflight=preflight,
        throttle_max_pct=int(top) if top is not None else base.throttle_max_pct,
        throttle_react_s=_or(_number(raw, "throttle_react_s", where), base.throttle_react_s),
        margin_s=_or(_number(raw, "margin_s", where), base.margin_s),
        wait_tolerance=_or(_number(raw, "wait_tolerance", where, lo=1), base.wait_tolerance),
        wait_passes=_or(_number(raw, "wait_passes", where), base.wait_passes),
        bulk_pass_downtime_ms=int(_or(bulk, base.bulk_pass_downtime_ms)),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _ramp(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise _bad(where, "[ramp] must be a table")
    if not raw:
        return {}
    if unknown := set(raw) - {"max_downtime_ms", "steps", "delay_s_per_gib", "min_gib"}:
        raise _bad(where, f"unknown key(s) in [ramp]: {', '.join(sorted(unknown))}")
    top = _number(raw, "max_downtime_ms", where, lo=1)
    steps = _number(raw, "steps", where, lo=1)
    if top is None or top > MAX_DOWNTIME_MS:
        raise _bad(where, "[ramp] needs max_downtime_ms")
    out = {"max_downtime_ms": top, "steps": steps or 10.0}
    for key in ("delay_s_per_gib", "min_gib"):
        value = _number(raw, key, where)
        if value is not None:
            out[key] = value
    return out


def _timeout(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad(where, "[timeout] must be a table")
    if not raw:
        return {}
    if unknown := set(raw) - {"s_per_gib", "min_gib", "action"}:
        raise _bad(where, f"unknown key(s) in [timeout]: {', '.join(sorted(unknown))}")
    per_gib = _number(raw, "s_per_gib", where, lo=0.001)
    action = raw.get("action", "abort")
    if per_gib is None or action not in ("abort", "postcopy", "suspend"):
        raise _bad(where, "[timeout] needs s_per_gib and an action of abort, postcopy or suspend")
    return {
        "s_per_gib": per_gib,
        "min_gib": _number(raw, "min_gib", where) or 0.0,
        "action": action,
    }


def policy_dir() -> Path:
    env = os.environ.get(POLICY_DIR_ENV)
    return Path(env) if env else _REPO_ROOT / "policies"


def builtin_names() -> list[str]:
    """Names of the built-in policies."""
    return sorted(p.stem for p in policy_dir().glob("*.toml"))


def load_policy(ref: str) -> Policy:
    """
    The policy *ref* names: a built-in name, or the TOML text of a policy.

    :raise VmferryError: ``INVALID_ARG`` for an unknown name or a bad policy.
    """
    if "\n" in ref or "=" in ref:
        return parse_policy(ref)
    path = policy_dir() / f"{ref}.toml"
    if "/" in ref or not path.is_file():
        known = ", ".join(builtin_names()) or "none found in " + str(policy_dir())
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"unknown migration policy '{ref}' (built-in: {known})"
        )
    policy = parse_policy(path.read_text(), where=str(path))
    if policy.name != ref:
        raise _bad(str(path), f"'name' is {policy.name!r}, the file says {ref!r}")
    return policy
