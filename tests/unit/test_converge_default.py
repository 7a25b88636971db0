"""The default contract, the automatic deadline and the guest-visible downtime (no QEMU)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from vmferry.daemon.config import load_config
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags as F
from vmferry.migration.params import MigrationParams
from vmferry.migration.policy import ConvergenceDefaults, Engine, auto_deadline, terms
from vmferry.migration.policy.contract import AUTO_DEADLINE_FLOOR_S, AUTO_DEADLINE_PASSES
from vmferry.migration.stats import completed_stats, guest_downtime_ms
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import MigrationStatus
from vmferry.testing.fakemonitor import FakeMonitor

MIB = 1 << 20
GIB = 1 << 30
DEFAULTS = ConvergenceDefaults()


def test_a_request_without_a_contract_gets_the_daemons() -> None:
    got = terms(MigrationParams(), DEFAULTS)
    assert got is not None
    assert got.policy.name == "vmferry" and got.origin == "default"
    assert got.contract.downtime_target_ms == 300 and got.contract.deadline_s is None
    assert got.auto_deadline
    fixed = terms(MigrationParams(), ConvergenceDefaults(downtime_target_ms=80, deadline_s=90))
    assert fixed is not None and not fixed.auto_deadline
    assert (fixed.contract.downtime_target_ms, fixed.contract.deadline_s) == (80, 90.0)


def test_what_the_request_names_wins_and_the_rest_is_filled_in() -> None:
    got = terms(MigrationParams(downtime_target_ms=50), ConvergenceDefaults(deadline_s=30))
    assert got is not None and got.origin == "request+default"
    assert (got.contract.downtime_target_ms, got.contract.deadline_s) == (50, 30.0)
    own = terms(MigrationParams(policy="nova", downtime_target_ms=50, deadline_s=9), DEFAULTS)
    assert own is not None and own.origin == "request" and own.policy.name == "nova"
    # a downtime limit set for the migration is its target when it names none
    limit = terms(MigrationParams(downtime_limit_ms=700), DEFAULTS)
    assert limit is not None and limit.contract.downtime_target_ms == 700


def test_policy_none_is_qemus_behaviour_without_a_default_deadline() -> None:
    none = terms(MigrationParams(policy="none"), ConvergenceDefaults(deadline_s=30))
    assert none is not None and none.policy.kind == "none"
    assert none.contract.deadline_s is None and not none.auto_deadline
    assert none.origin == "request"
    # its own deadline still holds
    late = terms(MigrationParams(policy="none", deadline_s=5), DEFAULTS)
    assert late is not None and late.contract.deadline_s == 5.0
    # a daemon whose default is "none": nothing unless the request asks
    assert terms(MigrationParams(), ConvergenceDefaults(policy="none")) is None
    asked = terms(MigrationParams(deadline_s=20), ConvergenceDefaults(policy="none"))
    assert asked is not None and asked.policy.name == "none" and asked.contract.deadline_s == 20


def test_without_defaults_only_a_named_contract_counts() -> None:
    assert terms(MigrationParams(), None) is None
    got = terms(MigrationParams(deadline_s=4), None)
    assert got is not None and got.policy.name == "vmferry" and got.contract.deadline_s == 4.0


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(VmferryError) as err:
        terms(MigrationParams(), ConvergenceDefaults(policy="nope"))
    assert err.value.code == ErrorCode.INVALID_ARG and "nope" in err.value.message


def test_auto_deadline_has_a_floor_and_grows_with_the_guest() -> None:
    assert auto_deadline(192 * MIB, 1 * GIB) == AUTO_DEADLINE_FLOOR_S
    assert auto_deadline(1 * GIB, 0) == AUTO_DEADLINE_FLOOR_S
    # 16 GiB over a 1 GbE link (~117 MiB/s): ten copies
    link = 117 * MIB
    assert math.isclose(auto_deadline(16 * GIB, link), AUTO_DEADLINE_PASSES * 16 * GIB / link)


def _dom(mon: FakeMonitor, iteration: int = 1) -> QemuDomain:
    return cast(
        QemuDomain,
        SimpleNamespace(
            name="g1",
            monitor=mon.as_monitor(),
            migration=SimpleNamespace(iteration=iteration, status=MigrationStatus.ACTIVE),
        ),
    )


async def test_the_engine_fixes_an_automatic_deadline_and_reports_its_terms() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    got = terms(MigrationParams(), DEFAULTS)
    assert got is not None
    eng = Engine(
        _dom(mon),
        got.policy,
        got.contract,
        F.LIVE,
        bandwidth_cap_bps=2 * MIB,  # 1 GiB at 2 MiB/s: 512 s a copy
        memory_bytes=GIB,
        auto_deadline=got.auto_deadline,
        origin=got.origin,
    )
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    assert "policy_deadline_s" not in eng.summary()
    mon.reply("query-migrate", {"status": "active", "ram": {"remaining": GIB, "mbps": 16.0}})
    await eng.step()
    summary = eng.summary()
    assert summary["policy_deadline_s"] == AUTO_DEADLINE_PASSES * 512
    assert summary["policy_deadline_auto"] is True and summary["policy_contract"] == "default"
    assert summary["policy_choice"]  # what it decided, in words
    assert 0 < summary["policy_deadline_left_s"] <= summary["policy_deadline_s"]


async def test_the_engine_leaves_qemu_alone_once_it_stopped_the_guest_to_switch_over() -> None:
    # QEMU's last MIGRATION_PASS comes from inside the stop-and-copy: no query-migrate then.
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    mon.always("query-migrate", {"status": "active", "ram": {"remaining": GIB, "mbps": 16.0}})
    got = terms(MigrationParams(), DEFAULTS)
    assert got is not None
    dom = _dom(mon)
    eng = Engine(dom, got.policy, got.contract, F.LIVE, bandwidth_cap_bps=0, memory_bytes=GIB)
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    await eng.step()
    looks = mon.commands().count("query-migrate")
    assert looks == 1
    dom.migration.iteration, dom.migration.status = 2, MigrationStatus.DEVICE
    assert eng.due()  # the wait loop wakes for the boundary...
    await eng.step()
    assert mon.commands().count("query-migrate") == looks  # ...and the engine does not ask
    assert not eng.due()
    dom.migration.iteration, dom.migration.status = 3, MigrationStatus.ACTIVE
    await eng.step()  # a pass boundary of a running migration is looked at as before
    assert mon.commands().count("query-migrate") == looks + 1


def test_guest_downtime_is_an_upper_bound_from_one_clock_per_interval() -> None:
    # stopped at 100.000 s, Finish's reply here at 100.250 s, the guest resumed 30 ms before it
    assert guest_downtime_ms(100.0, 100.25, 30) == 220
    assert guest_downtime_ms(100.0, 100.01, 30) == 0  # never negative
    assert guest_downtime_ms(0.0, 100.25, 30) is None  # the guest never stopped here
    assert guest_downtime_ms(100.0, None, 30) is None
    assert guest_downtime_ms(100.0, 100.25, None) is None  # v2, or left paused there


def test_completed_stats_keep_qemus_downtime_beside_the_guests() -> None:
    dom = cast(
        QemuDomain,
        SimpleNamespace(
            migration=SimpleNamespace(
                stats={"downtime_ms": 40, "status": "completed"}, started=90.0, stopped=100.0
            )
        ),
    )
    stats = completed_stats(dom, {"downtime": 40, "resumed_ago": 5}, arrived=100.07)
    assert stats["downtime_ms"] == 40 and stats["guest_downtime_ms"] == 65
    assert "guest_downtime_ms" not in completed_stats(dom, {"downtime": 40})


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmferryd.toml"
    path.write_text(text)
    return path


def test_config_default_contract(tmp_path: Path) -> None:
    mig = load_config(None).migration
    assert (mig.downtime_target_ms, mig.deadline_s, mig.policy) == (300, 0.0, "vmferry")
    text = '[migration]\ndowntime_target_ms = 100\ndeadline_s = 120\npolicy = "none"\n'
    mig = load_config(_config(tmp_path, text)).migration
    assert (mig.downtime_target_ms, mig.deadline_s, mig.policy) == (100, 120.0, "none")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("downtime_target_ms = 0\n", "migration.downtime_target_ms"),
        ("deadline_s = -1\n", "migration.deadline_s"),
        ("deadline_s = nan\n", "migration.deadline_s"),
        ('policy = "../etc/x"\n', "migration.policy"),
        ('policy = "nope"\n', "not a built-in policy"),
    ],
)
def test_config_default_contract_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(VmferryError) as err:
        load_config(_config(tmp_path, "[migration]\n" + text))
    assert err.value.code == ErrorCode.INVALID_ARG and words in err.value.message
