"""The policy engine: runs beside one outgoing migration and acts on QEMU.

The source's wait loop (:func:`vmferry.migration.source._wait_completion`)
wakes on every QEMU event; it calls :meth:`Engine.step`, which looks at
``query-migrate`` at each iteration boundary (``MIGRATION_PASS``) and every
:data:`TICK_S` seconds, refits the dirty model, predicts, and lets the policy
act: ``migrate-set-parameters`` (downtime limit, CPU throttle), the post-copy
switch, ``stop``, or an abort (an exception out of :meth:`Engine.step`).

Every action is logged and kept; :meth:`Engine.summary` adds them, with the
last prediction, to the migration's statistics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from vmferry.domain.state import DomainState
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.policy import decide
from vmferry.migration.policy.contract import auto_deadline
from vmferry.migration.policy.decide import Action, Contract, Situation
from vmferry.migration.policy.model import DirtyModel, Prediction, fit, predict
from vmferry.migration.policy.spec import Adaptive, Policy, Step
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import MigrationStatus
from vmferry.qemu.monitor import Monitor

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Seconds between looks at a migration when no iteration boundary comes.
TICK_S = 0.5
#: QEMU's downtime limit during the first (bulk) pass of an adaptive migration.
#: QEMU switches over as soon as what is left fits in its limit at the bandwidth it
#: measured; its first reading comes ~0.1 s into the bulk pass, when most of the
#: guest's RAM has never been sent yet. With the contract's limit (300 ms by
#: default) it would stop the guest there and send the rest of the bulk pass
#: with the guest paused (measured: 46-132 MiB of a 192 MiB guest, 100-230 ms of
#: downtime); those pages cost the guest nothing sent live. From MIGRATION_PASS 2
#: on, or from the first throttle step (a guest that outruns the link), the
#: contract's limit applies. The default of the policy's ``bulk_pass_downtime_ms``.
BULK_PASS_LIMIT_MS = Adaptive.bulk_pass_downtime_ms
#: QEMU's own throttle settings (restored for migrations without a policy).
QEMU_THROTTLE = {
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "throttle-trigger-threshold": 50,
}
# While the policy does not want a throttle: QEMU throttles only when a period
# dirties more than it sends (where pre-copy cannot converge anyway).
_DORMANT_THRESHOLD = 100
_EAGER_THRESHOLD = 1
# Sampled pages per GiB for calc-dirty-rate: QEMU's maximum, the guests are small.
_SAMPLE_PAGES = 4096
_BANDWIDTH_ALPHA = 0.3
# The preflight alone decides only above this many times the bandwidth (it samples pages).
_DECISIVE = 1.5
# Assumed rate of an unlimited migration when judging whether a preflight fits in pass 1.
_FAST_LINK_BPS = 1 << 30
# A throttle level is ineffective when the guest dirties this much more than a
# CPU-bound guest would at that level (a rate-limited writer catches up between slices).
_INEFFECTIVE = 1.5

# QEMU's states from the guest's stop for the switchover on (and after it): no look is useful.
_SWITCHOVER = frozenset(
    {
        MigrationStatus.DEVICE,
        MigrationStatus.PRE_SWITCHOVER,
        MigrationStatus.COMPLETED,
        MigrationStatus.FAILED,
        MigrationStatus.CANCELLING,
        MigrationStatus.CANCELLED,
    }
)

#: Switches a running migration to post-copy (``vmferry.migration.postcopy.switch``).
PostcopySwitch = Callable[[QemuDomain], Awaitable[None]]


class Engine:
    """One policy driving one outgoing migration."""

    def __init__(
        self,
        dom: QemuDomain,
        policy: Policy,
        contract: Contract,
        flags: MigrateFlags,
        *,
        bandwidth_cap_bps: float,
        memory_bytes: int,
        postcopy_switch: PostcopySwitch | None = None,
        auto_deadline: bool = False,
        origin: str = "request",
    ) -> None:
        self.dom = dom
        #: The deadline is automatic: set once the bandwidth is known (.contract.auto_deadline).
        self.auto_deadline = auto_deadline
        self.origin = origin  # where the contract came from: request, default, request+default
        self.choice = ""  # what the engine chose at its last look, for domjobinfo
        self._postcopy_switch = postcopy_switch  # None: a policy cannot switch to post-copy
        self.policy = policy
        self.contract = contract
        self.flags = flags
        self.cap_bps = bandwidth_cap_bps
        self.memory_bytes = memory_bytes
        self.steps: tuple[Step, ...] = policy.schedule(memory_bytes)
        self.actions: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.limit_ms = 300
        self.restore: dict[str, Any] = {}  # QEMU parameters to put back at the end
        self.throttle_usable = bool(flags & MigrateFlags.AUTO_CONVERGE)
        self.dormant = False  # the throttle trigger is parked at _DORMANT_THRESHOLD
        self.postcopy_usable = bool(flags & MigrateFlags.POSTCOPY)
        self.prediction: Prediction | None = None
        self.model: DirtyModel | None = None
        self._eta_at: float | None = None
        self._samples: list[tuple[float, float]] = []
        self._pass_remaining: list[float] = []  # bytes left at each boundary after the bulk pass
        self._held: set[int] = set()  # iterations at which a predicted stall was not acted on
        self._hold_reason = ""
        self._fitted: list[tuple[float, float]] | None = None  # the samples self.model is from
        self._seen_it = 0
        self._pass_started = 0.0
        self._next_tick = 0.0
        self._fired = 0
        self._last_eval = -math.inf
        self._last_eval_it = 0
        self._throttle_seen = 0
        self._throttle_asked = 0
        self._model_throttle = 0  # the throttle level self.model was fitted at
        self._expected: DirtyModel | None = None  # the model at this throttle level, if CPU-bound
        self._ineffective = False
        self._forced = False
        self._suspended = False
        self._handed_over = False  # post-copy runs: nothing left to decide
        self._preflight_at: float | None = None
        self._preflight: dict[str, float] = {}
        self.bandwidth_bps = bandwidth_cap_bps
        # QEMU's limit is the policy's bulk_pass_downtime_ms, not limit_ms, for now.
        self._bulk_pass = False

    # -- start and end ---------------------------------------------------------------------

    async def start(self, mon: Monitor, *, explicit_downtime_ms: int | None) -> None:
        """Before ``migrate``: capabilities, first parameters, the dirty-rate preflight."""
        current = await mon.execute("query-migrate-parameters")
        self.limit_ms = int(current.get("downtime-limit", 300))
        self.restore["downtime-limit"] = self.limit_ms
        values: dict[str, Any] = {}
        if self.policy.kind == "adaptive":
            target = self.contract.downtime_target_ms
            values["downtime-limit"] = target  # free: within the contract
            bulk = self.policy.adaptive.bulk_pass_downtime_ms
            if 0 < bulk < target:
                # QEMU's limit stays low until the bulk pass is over (step() raises it).
                self._bulk_pass = True
        else:
            initial = self.policy.initial_downtime(self.memory_bytes)
            if initial is not None and explicit_downtime_ms is None:
                values["downtime-limit"] = initial
        if self.policy.auto_converge and not self.throttle_usable:
            await mon.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "auto-converge", "state": True}]},
            )
            self.throttle_usable = True
            self.restore.update({k: current.get(k, v) for k, v in QEMU_THROTTLE.items()})
            if self.policy.kind == "adaptive":
                values.update(QEMU_THROTTLE, **{"throttle-trigger-threshold": _DORMANT_THRESHOLD})
                self.dormant = True
            else:
                values.update(QEMU_THROTTLE)
        if values:
            sent = dict(values)
            if self._bulk_pass:
                sent["downtime-limit"] = self.policy.adaptive.bulk_pass_downtime_ms
            await mon.execute("migrate-set-parameters", sent)
            self.limit_ms = int(values.get("downtime-limit", self.limit_ms))
        if "downtime-limit" in values:
            self._record(Action("downtime", values["downtime-limit"], "initial limit"), 0)
        if self._preflight_useful():
            await self._start_preflight(mon)

    def _preflight_useful(self) -> bool:
        mode = self.policy.adaptive.preflight
        if self.policy.kind != "adaptive" or mode == "never":
            return False
        if mode == "always":
            return True
        # Only when it ends well inside the first pass: then it costs no wall time.
        first_pass_s = self.memory_bytes / (self.cap_bps or _FAST_LINK_BPS)
        return first_pass_s >= self._preflight_window_s() + 0.5

    def _preflight_window_s(self) -> float:
        # The window that matters: one switchover's worth of dirtying.
        return min(1.0, max(0.2, self.contract.downtime_target_ms / 1000.0))

    async def _start_preflight(self, mon: Monitor) -> None:
        window_ms = int(self._preflight_window_s() * 1000)
        try:
            await mon.execute(
                "calc-dirty-rate",
                {
                    "calc-time": window_ms,
                    "calc-time-unit": "millisecond",
                    "sample-pages": _SAMPLE_PAGES,
                },
            )
            self._preflight_at = time.monotonic()
        except VmferryError as err:
            log.info("%s: no dirty-rate preflight: %s", self.dom.name, err.message)

    async def close(self) -> None:
        """Put back what the policy changed in QEMU (the guest may stay here after all)."""
        mon = self.dom.monitor
        if not self.restore or mon is None or not mon.connected:
            return
        try:
            await mon.execute("migrate-set-parameters", self.restore)
        except VmferryError as err:
            log.warning(
                "%s: could not restore migration parameters: %s", self.dom.name, err.message
            )

    # -- the loop's side -------------------------------------------------------------------

    def due(self) -> bool:
        """Whether :meth:`step` has something to look at (an iteration boundary, or a tick)."""
        return self.dom.migration.iteration != self._seen_it or time.monotonic() >= self._next_tick

    def wait_s(self, left: float | None) -> float:
        tick = max(0.0, self._next_tick - time.monotonic())
        return tick if left is None else min(left, tick)

    async def step(self) -> None:
        """Observe, predict, act. Raises to abort the migration."""
        now = time.monotonic()
        iteration = self.dom.migration.iteration
        boundary = iteration != self._seen_it
        if not boundary and now < self._next_tick:
            return
        self._next_tick = now + TICK_S
        mon = self.dom.monitor
        if mon is None or not mon.connected or self._handed_over or self._switching_over():
            self._seen_it = iteration
            return
        if self._bulk_pass and iteration >= 2:
            # The bulk pass is over (MIGRATION_PASS 2): from here on the contract's limit.
            self._bulk_pass = False
            await self._set(mon, {"downtime-limit": self.limit_ms})
        info = await mon.execute("query-migrate")
        if boundary:
            self._boundary(iteration, now, info)
        await self._poll_preflight(mon, now)
        if info.get("status") != MigrationStatus.ACTIVE:
            return
        ram = info.get("ram") or {}
        remaining = float(ram.get("remaining", 0))
        self._observe_bandwidth(float(ram.get("mbps", 0.0)) * 1e6 / 8)
        self._fix_deadline()
        throttle = int(info.get("cpu-throttle-percentage", 0))
        await self._track_throttle(mon, throttle)
        if self._samples != self._fitted:  # a fit costs a few ms: only on new samples
            self._fitted = list(self._samples)
            hint = self.model.working_set if self.model is not None else math.inf
            fitted = fit(self._samples, memory_bytes=self.memory_bytes, working_set_hint=hint)
            self.model = fitted or self._model_guess(throttle)
            self._model_throttle = throttle
        elapsed = now - self.started
        actions = self._decide(elapsed, remaining, throttle, iteration, now)
        self.choice = self._choice_text(actions, iteration)
        for action in actions:
            try:
                await self._act(mon, action, iteration, throttle)
            except VmferryError as err:
                # QEMU refusing one setting must not sink the migration; an abort must.
                if action.kind == "abort" or err.code != ErrorCode.QEMU_FAILED:
                    raise
                self._record(action, iteration, skipped=err.message)
            if self._handed_over:
                break
        self._predict(remaining, now)

    def _switching_over(self) -> bool:
        """QEMU stopped the guest to send the rest (its events said so): nothing left to decide.

        The last ``MIGRATION_PASS`` comes from inside the stop-and-copy, where QEMU's
        migration thread holds the big lock until the device state is out: a
        ``query-migrate`` then would wait there, and its answer and the look after it
        would cost the daemon CPU while the guest is paused.
        """
        return self.dom.migration.status in _SWITCHOVER

    def _fix_deadline(self) -> None:
        """An automatic deadline, once the bandwidth is known (the cap, or a first reading)."""
        if not self.auto_deadline or self.contract.deadline_s is not None:
            return
        if self.bandwidth_bps > 0:
            seconds = round(auto_deadline(self.memory_bytes, self.bandwidth_bps), 1)
            self.contract = replace(self.contract, deadline_s=seconds)
            log.info(
                "migration policy %s on %s: automatic deadline %g s",
                self.policy.name,
                self.dom.name,
                seconds,
            )

    def _choice_text(self, actions: list[Action], iteration: int) -> str:
        """What the engine decided at this look, in words (domjobinfo's "Policy choice")."""
        if actions:
            last = actions[-1]
            value = f" {int(last.value)}" if last.kind in ("downtime", "throttle") else ""
            return last.kind + value + (f": {last.reason}" if last.reason else "")
        if self.policy.kind == "none":
            return "nothing (QEMU's defaults)"
        if self._handed_over:
            return "nothing (post-copy runs)"
        if iteration in self._held:
            return f"wait: {self._hold_reason}"
        if self._throttle_asked or (self._throttle_seen and len(self._samples) < 2):
            return "wait: the last throttle step is taking effect"
        if self.prediction is not None and self.prediction.converges:
            return "nothing: pre-copy converges"
        if self.model is None:
            return "wait: measuring the dirty rate"
        return "nothing"

    def _observe_bandwidth(self, measured: float) -> None:
        """The cap when there is one; else a smoothed reading (short periods read low)."""
        if self.cap_bps > 0 or measured <= 0:
            return
        if self.bandwidth_bps <= 0:
            self.bandwidth_bps = measured
        else:
            self.bandwidth_bps += _BANDWIDTH_ALPHA * (measured - self.bandwidth_bps)

    def _boundary(self, iteration: int, now: float, info: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        # One pass ended: it dirtied what is left now, in the time it took.
        if (
            iteration == self._seen_it + 1
            and self._pass_started
            and info.get("status") == MigrationStatus.ACTIVE
        ):
            self._samples.append((now - self._pass_started, float(ram.get("remaining", 0))))
            del self._samples[:-8]
        # Pass 1 sends all of RAM: progress counts from the end of it on.
        if iteration >= 2 and info.get("status") == MigrationStatus.ACTIVE:
            self._pass_remaining.append(float(ram.get("remaining", 0)))
            del self._pass_remaining[:-4]
        self._seen_it = iteration
        self._pass_started = now

    def _model_guess(self, throttle: int) -> DirtyModel | None:
        """No sample at this throttle level yet: the last model, slowed as a CPU-bound guest."""
        if self.model is None:
            return None
        running_then = 1.0 - self._model_throttle / 100.0
        return self.model.throttled((1.0 - throttle / 100.0) / running_then)

    async def _poll_preflight(self, mon: Monitor, now: float) -> None:
        if self._preflight_at is None or now < self._preflight_at + self._preflight_window_s():
            return
        try:
            got = await mon.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
        except VmferryError as err:
            log.info("%s: dirty-rate preflight: %s", self.dom.name, err.message)
            self._preflight_at = None
            return
        if got.get("status") != "measured":
            return
        window_s = float(got.get("calc-time", 0)) / 1000.0
        rate = float(got.get("dirty-rate", 0)) * MIB
        self._preflight = {
            "policy_preflight_dirty_rate_bps": rate,
            "policy_preflight_window_ms": window_s * 1000,
            "policy_preflight_ms": (now - self._preflight_at) * 1000,
        }
        self._preflight_at = None
        if window_s > 0 and self._throttle_seen == 0:
            self._samples.insert(0, (window_s, rate * window_s))

    async def _track_throttle(self, mon: Monitor, throttle: int) -> None:
        if throttle == self._throttle_seen:
            return
        # The guest runs at another speed now: only samples taken at this speed count.
        self._samples.clear()
        self._expected = self._model_guess(throttle)
        self._throttle_seen = throttle
        if self._throttle_asked and throttle >= self._throttle_asked:
            self._throttle_asked = 0
            if self.dormant:
                # Hold this level: QEMU would go on raising it on its own.
                await self._set(mon, {"throttle-trigger-threshold": _DORMANT_THRESHOLD})

    def _throttle_ineffective(self) -> bool:
        if self._throttle_seen == 0 or len(self._samples) < 2 or self._expected is None:
            return False
        if self.model is None:
            return False
        window = self.contract.downtime_target_ms / 1000.0
        return self.model.dirtied(window) > _INEFFECTIVE * self._expected.dirtied(window)

    # -- deciding ---------------------------------------------------------------------------

    def _decide(
        self, elapsed: float, remaining: float, throttle: int, iteration: int, now: float
    ) -> list[Action]:
        if self.policy.kind == "adaptive":
            situation = Situation(
                elapsed_s=elapsed,
                remaining=remaining,
                bandwidth_bps=self.bandwidth_bps,
                model=self._decisive_model(),
                downtime_limit_ms=self.limit_ms,
                throttle_pct=throttle,
                # a new level needs two passes of its own before it can be judged
                throttle_pending=self._throttle_asked > throttle
                or (throttle > 0 and len(self._samples) < 2),
                throttle_usable=self.throttle_usable,
                throttle_ineffective=self._throttle_ineffective(),
                postcopy_usable=self.postcopy_usable,
                forced=self._forced,
                suspended=self._suspended,
                pass_remaining=tuple(self._pass_remaining),
            )
            pred, actions = decide.choose(situation, self.contract, self.policy.adaptive)
            if not actions and pred is not None and not pred.converges and not self._forced:
                self._note_hold(situation, pred, iteration)
            return actions
        deadline = self.contract.deadline_s
        if deadline is not None and elapsed >= deadline:
            return [Action("abort", 0.0, f"deadline of {deadline:g} s passed")]
        if self.policy.kind == "none":
            return []
        return self._schedule(elapsed, iteration, now)

    def _note_hold(self, situation: Situation, pred: Prediction, iteration: int) -> None:
        """Keep (and log once a pass) why a predicted stall was left alone."""
        why = decide.hold_reason(situation, self.contract, self.policy.adaptive, pred)
        if not why or iteration in self._held:
            return
        self._held.add(iteration)
        self._hold_reason = why
        log.info(
            "migration policy %s on %s: holding at iteration %d (%s)",
            self.policy.name,
            self.dom.name,
            iteration,
            why,
        )

    def _decisive_model(self) -> DirtyModel | None:
        """The model, once it can be trusted to act on.

        One pass cannot tell a small working set from a large one: wait for two.
        The preflight alone (a sample, of one switchover's length) is enough only
        when it is clear: the guest dirtying far faster than the link moves.
        """
        if self.model is None:
            return None
        if len(self._samples) >= 2 or self._throttle_seen:
            return self.model
        if self._preflight and self.model.rate_bps >= _DECISIVE * self.bandwidth_bps:
            return self.model
        return None

    def _schedule(self, elapsed: float, iteration: int, now: float) -> list[Action]:
        interval = self.policy.monitor_interval_s
        if interval > 0 and now - self._last_eval < interval:
            return []
        self._last_eval = now
        step = decide.due_step(self.steps, self._fired, iteration, elapsed)
        # VDSM fires an iteration-keyed step only when QEMU iterated since its last look.
        if step is None or (step.after_iteration is not None and iteration == self._last_eval_it):
            return []
        self._last_eval_it = iteration
        self._fired += 1
        return [Action(step.action, step.value, _trigger(step))]

    def _predict(self, remaining: float, now: float) -> None:
        if self.model is None or self.bandwidth_bps <= 0:
            return
        self.prediction = predict(remaining, self.bandwidth_bps, self.model, self.limit_ms / 1000.0)
        self._eta_at = now + self.prediction.eta_s if self.prediction.converges else None

    # -- acting -----------------------------------------------------------------------------

    async def _act(self, mon: Monitor, action: Action, iteration: int, throttle: int) -> None:
        kind = action.kind
        if kind == "downtime":
            value = int(min(action.value, 2_000_000))
            await self._set(mon, {"downtime-limit": value})
            self._bulk_pass = False  # QEMU has this limit now, bulk pass or not
            self.limit_ms = value
            self._forced = self._forced or (
                self.policy.kind == "adaptive" and value > self.contract.downtime_target_ms
            )
            self._record(action, iteration)
        elif kind == "throttle":
            if not self.throttle_usable:
                self._record(action, iteration, skipped="auto-converge is off for this migration")
                return
            pct = int(action.value)
            if throttle == 0:
                values = {
                    "cpu-throttle-initial": pct,
                    "throttle-trigger-threshold": _EAGER_THRESHOLD,
                }
            else:
                values = {
                    "cpu-throttle-increment": max(1, pct - throttle),
                    "throttle-trigger-threshold": _EAGER_THRESHOLD,
                }
            if self._bulk_pass:
                # A guest that outruns the link: the switchover may come at the end of the
                # bulk pass, with what the throttled guest dirtied, within the target.
                values["downtime-limit"] = self.limit_ms
                self._bulk_pass = False
            await self._set(mon, values)
            self._throttle_asked = pct
            self._record(action, iteration)
        elif kind == "postcopy":
            await self._postcopy(action, iteration)
        elif kind == "suspend":
            if self.dom.state == DomainState.RUNNING:
                self.dom.pending_pause_reason = "migration"
                await mon.execute("stop")
            self._suspended = True
            self._record(action, iteration)
        elif kind == "abort":
            self._record(action, iteration)
            deadline = self.contract.deadline_s is not None and "deadline" in action.reason
            raise VmferryError(
                ErrorCode.OPERATION_TIMEOUT if deadline else ErrorCode.OPERATION_ABORTED,
                f"migration of domain '{self.dom.name}' aborted by policy "
                f"'{self.policy.name}': {action.reason}; the guest keeps running on the source"
                + self._actions_text(),
            )

    def _actions_text(self) -> str:
        done = [a for a in self.actions[:-1] if a.get("reason") != "initial limit"]
        if not done:
            return ""
        return (
            " (actions: "
            + ", ".join(
                f"{a['action']}{' ' + str(a['value']) if 'value' in a else ''} at {a['t_s']:g} s"
                + (" skipped" if a.get("skipped") else "")
                for a in done
            )
            + ")"
        )

    async def _postcopy(self, action: Action, iteration: int) -> None:
        why = ""
        if not self.flags & MigrateFlags.POSTCOPY:
            why = "post-copy is not enabled for this migration"
        elif self._postcopy_switch is None:
            why = "post-copy switch-over is not available in this build yet"
        if why:
            self.postcopy_usable = False
            self._record(action, iteration, skipped=why)
            if self.policy.kind == "schedule":
                # oVirt's post-copy policy: abort only if the switch is impossible.
                self._last_eval = -math.inf
            return
        assert self._postcopy_switch is not None
        await self._postcopy_switch(self.dom)
        self._handed_over = True
        self._record(action, iteration)

    async def _set(self, mon: Monitor, values: dict[str, Any]) -> None:
        await mon.execute("migrate-set-parameters", values)
        for key in values:
            if key != "downtime-limit":
                self.restore.setdefault(key, QEMU_THROTTLE.get(key))

    def _record(self, action: Action, iteration: int, *, skipped: str = "") -> None:
        entry: dict[str, Any] = {
            "t_s": round(time.monotonic() - self.started, 3),
            "iteration": iteration,
            "action": action.kind,
        }
        if action.kind in ("downtime", "throttle"):
            entry["value"] = int(action.value)
        if action.reason:
            entry["reason"] = action.reason
        if skipped:
            entry["skipped"] = skipped
        self.actions.append(entry)
        log.info(
            "migration policy %s on %s: %s%s%s",
            self.policy.name,
            self.dom.name,
            action.kind,
            f" {int(action.value)}" if "value" in entry else "",
            f" skipped ({skipped})" if skipped else f" ({action.reason})" if action.reason else "",
        )

    # -- what it reports ---------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The policy's part of the job statistics: contract, prediction, ETA, actions."""
        out: dict[str, Any] = {
            "policy": self.policy.name,
            "policy_downtime_target_ms": self.contract.downtime_target_ms,
            "policy_downtime_limit_ms": self.limit_ms,
            "policy_actions": list(self.actions),
            "policy_contract": self.origin,
        }
        if self.choice:
            out["policy_choice"] = self.choice
        if self.contract.deadline_s is not None:
            out["policy_deadline_s"] = self.contract.deadline_s
            left = self.contract.deadline_s - (time.monotonic() - self.started)
            out["policy_deadline_left_s"] = round(max(0.0, left), 1)
        if self.auto_deadline:
            out["policy_deadline_auto"] = True
        if self._throttle_seen:
            out["policy_throttle_pct"] = self._throttle_seen
        if self.model is not None:
            out["policy_dirty_rate_bps"] = int(self.model.rate_bps)
            if not math.isinf(self.model.working_set):
                out["policy_working_set_bytes"] = int(self.model.working_set)
        pred = self.prediction
        if pred is not None:
            out["policy_converges"] = pred.converges
            out["policy_passes"] = pred.passes
            if not math.isinf(pred.needed_downtime_s):
                out["policy_needed_downtime_ms"] = int(pred.needed_downtime_s * 1000)
            if pred.converges:
                out["policy_expected_downtime_ms"] = int(pred.downtime_s * 1000)
            if self._eta_at is not None:
                out["policy_eta_s"] = round(max(0.0, self._eta_at - time.monotonic()), 2)
        if self._held:
            out["policy_held_passes"] = len(self._held)
            out["policy_hold_reason"] = self._hold_reason
        out.update({k: round(v, 1) for k, v in self._preflight.items()})
        return out


def _trigger(step: Step) -> str:
    if step.after_iteration is not None:
        return f"after iteration {step.after_iteration}"
    return f"after {step.after_s:g} s"
