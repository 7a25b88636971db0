"""Convergence policies for outgoing migrations (issue 5 §2).

Per migration, a contract (:class:`~vmferry.migration.params.MigrationParams`
``downtime_target_ms`` and ``deadline_s``) and a policy (``policy``: a
built-in name from ``policies/*.toml`` or a policy's TOML text). The source
side calls :func:`prepare` before ``migrate``, then on each wake-up of its wait
loop :meth:`Engine.step`, and :func:`finish` at the end; the daemon shows
:func:`live_stats` in ``domjobinfo``.

A live migration without a contract of its own runs under the daemon's
default one (:mod:`.contract`: ``[migration] downtime_target_ms``,
``deadline_s``, ``policy``). Policy ``none`` without a contract changes
nothing: QEMU's defaults, as libvirt has them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.policy.contract import (
    ConvergenceDefaults,
    Terms,
    auto_deadline,
    terms,
)
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
    "ConvergenceDefaults",
    "DirtyModel",
    "Engine",
    "Policy",
    "PostcopySwitch",
    "Prediction",
    "Situation",
    "Step",
    "Terms",
    "auto_deadline",
    "builtin_names",
    "choose",
    "engine_for",
    "finish",
    "fit",
    "forget",
    "live_stats",
    "load_policy",
    "parse_policy",
    "predict",
    "prepare",
    "restart_clock",
    "restore",
    "terms",
]

log = logging.getLogger(__name__)
MIB = 1 << 20

# The engine of each domain's running outgoing migration, by domain UUID.
_ENGINES: dict[str, Engine] = {}
# Engines whose migration completed: QEMU's settings are put back only if the
# guest stays here after all (Confirm cancelled); the source QEMU is killed otherwise.
_PARKED: dict[str, Engine] = {}


async def prepare(
    dom: QemuDomain,
    mon: Monitor,
    params: MigrationParams,
    flags: MigrateFlags,
    *,
    postcopy_switch: PostcopySwitch | None = None,
    defaults: ConvergenceDefaults | None = None,
) -> None:
    """Before ``migrate``: start *dom*'s engine if the migration runs under a policy.

    *defaults* (the daemon's ``[migration]`` contract) fill what *params* leave
    out; *postcopy_switch* lets the policy switch the migration to post-copy
    (None: it cannot).
    """
    for table in (_ENGINES, _PARKED):
        stale = table.pop(dom.uuid, None)
        if stale is not None:  # the last migrate command failed before its wait
            await stale.close()
    if not flags & MigrateFlags.LIVE:
        return
    got = terms(params, defaults)
    if got is None:
        return
    engine = Engine(
        dom,
        got.policy,
        got.contract,
        flags,
        bandwidth_cap_bps=params.bandwidth_mib_s * MIB,
        memory_bytes=dom.definition.memory_kib * 1024,
        postcopy_switch=postcopy_switch,
        auto_deadline=got.auto_deadline,
        origin=got.origin,
    )
    await engine.start(mon, explicit_downtime_ms=params.downtime_limit_ms)
    _ENGINES[dom.uuid] = engine


def engine_for(dom: QemuDomain) -> Engine | None:
    """The engine of *dom*'s outgoing migration, if it has one."""
    return _ENGINES.get(dom.uuid)


def restart_clock(dom: QemuDomain) -> None:
    """*dom*'s migration starts sending only now (it waited for its link): the deadline too."""
    engine = _ENGINES.get(dom.uuid)
    if engine is not None:
        engine.started = time.monotonic()


async def finish(dom: QemuDomain, stats: dict[str, Any] | None) -> None:
    """The wait is over: add the policy's report to *stats* (completed).

    A failed wait (*stats* None) puts QEMU's settings back now; a completed one
    parks the engine: the source QEMU is killed at Confirm, so nothing is spent
    between the switchover and the guest running there; :func:`restore` puts
    them back if the guest stays here after all.
    """
    engine = _ENGINES.pop(dom.uuid, None)
    if engine is None:
        return
    if stats is None:
        await engine.close()
        return
    stats.update(engine.summary())
    _PARKED[dom.uuid] = engine


async def restore(dom: QemuDomain) -> None:
    """The guest stays here after a completed wait (Confirm cancelled): QEMU's settings back."""
    engine = _PARKED.pop(dom.uuid, None)
    if engine is not None:
        await engine.close()


def forget(dom: QemuDomain) -> None:
    """The guest left this host: nothing to put back."""
    _PARKED.pop(dom.uuid, None)


def live_stats(dom: QemuDomain) -> dict[str, Any]:
    """The policy's figures for ``domjobinfo`` while the migration runs (empty without a policy)."""
    engine = _ENGINES.get(dom.uuid)
    return engine.summary() if engine is not None else {}
