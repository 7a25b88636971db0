"""Convergence policies for outgoing migrations (issue 5 §2).

Per migration, a contract (:class:`~vmferry.migration.params.MigrationParams`
``downtime_target_ms`` and ``deadline_s``) and a policy (``policy``: a
built-in name from ``policies/*.toml`` or a policy's TOML text). The source
side calls :func:`prepare` before ``migrate``, then on each wake-up of its wait
loop :meth:`Engine.step`, and :func:`finish` at the end; the daemon shows
:func:`live_stats` in ``domjobinfo``.

Without a policy and without a contract nothing is changed: QEMU's defaults,
as libvirt has them. A contract without a policy gets :data:`DEFAULT_POLICY`.
"""

from __future__ import annotations

import logging
from typing import Any

from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.policy.decide import Action, Contract, Situation, choose
from vmferry.migration.policy.engine import Engine, PostcopySwitch
from vmferry.migration.policy.model import DirtyModel, Prediction, fit, predict
from vmferry.migration.policy.spec import (
    DEFAULT_POLICY,
    Policy,
    Step,
    builtin_names,
    load_policy,
    parse_policy,
)
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.monitor import Monitor

__all__ = [
    "DEFAULT_POLICY",
    "Action",
    "Contract",
    "DirtyModel",
    "Engine",
    "Policy",
    "PostcopySwitch",
    "Prediction",
    "Situation",
    "Step",
    "builtin_names",
    "choose",
    "engine_for",
    "finish",
    "fit",
    "live_stats",
    "load_policy",
    "parse_policy",
    "predict",
    "prepare",
    "resolve",
]

log = logging.getLogger(__name__)
MIB = 1 << 20
#: The downtime target when a migration names a policy but no target: QEMU's default limit.
DEFAULT_TARGET_MS = 300

# The engine of each domain's running outgoing migration, by domain UUID.
_ENGINES: dict[str, Engine] = {}


def resolve(params: MigrationParams) -> Policy | None:
    """The policy a migration asked for; None: no policy, no contract (QEMU's defaults)."""
    name = params.policy
    if not name:
        if not params.downtime_target_ms and not params.deadline_s:
            return None
        name = DEFAULT_POLICY
    return load_policy(name)


def contract(params: MigrationParams) -> Contract:
    target = params.downtime_target_ms or params.downtime_limit_ms or DEFAULT_TARGET_MS
    return Contract(int(target), float(params.deadline_s) if params.deadline_s else None)


async def prepare(
    dom: QemuDomain,
    mon: Monitor,
    params: MigrationParams,
    flags: MigrateFlags,
    *,
    postcopy_switch: PostcopySwitch | None = None,
) -> None:
    """Before ``migrate``: start *dom*'s engine if the migration has a policy or a contract.

    *postcopy_switch* lets the policy switch the migration to post-copy (None: it cannot).
    """
    stale = _ENGINES.pop(dom.uuid, None)
    if stale is not None:  # the last migrate command failed before its wait
        await stale.close()
    policy = resolve(params)
    if policy is None or not flags & MigrateFlags.LIVE:
        return
    engine = Engine(
        dom,
        policy,
        contract(params),
        flags,
        bandwidth_cap_bps=params.bandwidth_mib_s * MIB,
        memory_bytes=dom.definition.memory_kib * 1024,
        postcopy_switch=postcopy_switch,
    )
    await engine.start(mon, explicit_downtime_ms=params.downtime_limit_ms)
    _ENGINES[dom.uuid] = engine


def engine_for(dom: QemuDomain) -> Engine | None:
    """The engine of *dom*'s outgoing migration, if it has one."""
    return _ENGINES.get(dom.uuid)


async def finish(dom: QemuDomain, stats: dict[str, Any] | None) -> None:
    """The wait is over: add the policy's report to *stats* (completed), restore QEMU's settings."""
    engine = _ENGINES.pop(dom.uuid, None)
    if engine is None:
        return
    if stats is not None:
        stats.update(engine.summary())
    await engine.close()


def live_stats(dom: QemuDomain) -> dict[str, Any]:
    """The policy's figures for ``domjobinfo`` while the migration runs (empty without a policy)."""
    engine = _ENGINES.get(dom.uuid)
    return engine.summary() if engine is not None else {}
