"""What the migration code sends to QEMU, against vmferry.testing.fakemonitor (no QEMU).

The real-QEMU versions of these paths are in tests/e2e (test_policy_e2e.py,
test_migration_e2e.py); here each runs in milliseconds.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration import params
from vmferry.migration.flags import MigrateFlags as F
from vmferry.migration.params import MigrationParams
from vmferry.migration.policy import Action, Contract, Engine, load_policy, parse_policy
from vmferry.migration.policy.engine import BULK_PASS_LIMIT_MS, QEMU_THROTTLE
from vmferry.qemu.domain import QemuDomain
from vmferry.qemu.migration_status import MigrationStatus
from vmferry.testing.fakemonitor import FakeMonitor

MIB = 1 << 20
GIB = 1 << 30


def caps(mon: FakeMonitor) -> dict[str, bool]:
    """The capabilities set by the last migrate-set-capabilities."""
    (*_, last) = mon.args_of("migrate-set-capabilities")
    return {c["capability"]: c["state"] for c in last["capabilities"]}


# -- the fake itself ---------------------------------------------------------------------------


async def test_fake_monitor_script_events_and_drop() -> None:
    mon = FakeMonitor(replies={"query-status": {"status": "running"}})
    mon.reply("query-migrate", {"status": "active"}, {"status": "completed"})
    mon.fail("migrate-pause", "not in postcopy")
    assert await mon.execute("query-status") == {"status": "running"}
    assert (await mon.execute("query-migrate"))["status"] == "active"
    assert (await mon.execute("query-migrate"))["status"] == "completed"
    assert await mon.execute("query-migrate") == {}  # script used up: QMP's empty answer
    with pytest.raises(VmferryError) as err:
        await mon.execute("migrate-pause")
    assert err.value.code is ErrorCode.QEMU_FAILED and "not in postcopy" in err.value.message
    seen: list[tuple[str, dict[str, Any]]] = []
    mon.add_event_handler(lambda name, data, _t: seen.append((name, data)))
    mon.emit("MIGRATION", {"status": "postcopy-active"})
    assert seen == [("MIGRATION", {"status": "postcopy-active"})]
    dropped: list[bool] = []
    mon.on_disconnect(lambda: dropped.append(True))
    mon.drop()
    assert dropped == [True]
    with pytest.raises(VmferryError) as err:
        await mon.execute("query-status")
    assert err.value.code is ErrorCode.OPERATION_FAILED
    assert mon.commands() == ["query-status", *["query-migrate"] * 3, "migrate-pause"]


# -- params.apply / reset --------------------------------------------------------------------


async def test_apply_source_sets_capabilities_then_parameters() -> None:
    mon = FakeMonitor()
    p = MigrationParams(bandwidth_mib_s=64, downtime_limit_ms=250, postcopy_bandwidth_mib_s=8)
    flags = F.LIVE | F.POSTCOPY | F.AUTO_CONVERGE
    await params.apply(mon.as_monitor(), p, flags, source=True)
    assert mon.commands() == ["migrate-set-capabilities", "migrate-set-parameters"]
    assert caps(mon) == {
        "return-path": True,
        "multifd": False,
        "postcopy-ram": True,
        "auto-converge": True,
        "xbzrle": False,
        "pause-before-switchover": False,  # off unless copying storage
    }
    assert mon.args_of("migrate-set-parameters") == [
        {"max-bandwidth": 64 * MIB, "downtime-limit": 250, "max-postcopy-bandwidth": 8 * MIB}
    ]


async def test_apply_source_without_a_limit_lifts_qemus_default_bandwidth() -> None:
    mon = FakeMonitor()
    await params.apply(mon.as_monitor(), MigrationParams(), F.LIVE, source=True)
    assert mon.args_of("migrate-set-parameters") == [{"max-bandwidth": params.UNLIMITED_BANDWIDTH}]


async def test_apply_destination_sets_only_its_side() -> None:
    mon = FakeMonitor()
    p = MigrationParams(bandwidth_mib_s=64, parallel_connections=4, downtime_limit_ms=250)
    await params.apply(mon.as_monitor(), p, F.LIVE | F.PARALLEL | F.COMPRESSED, source=False)
    # no auto-converge/xbzrle switches and no source-only parameters on the destination;
    # --compressed with --parallel is multifd's zstd, which the destination must know too
    assert caps(mon) == {"return-path": True, "multifd": True, "postcopy-ram": False}
    assert mon.args_of("migrate-set-parameters") == [
        {"multifd-channels": 4, "multifd-compression": "zstd"}
    ]
    mon2 = FakeMonitor()
    await params.apply(mon2.as_monitor(), MigrationParams(), F.LIVE, source=False)
    assert mon2.commands() == ["migrate-set-capabilities"]  # nothing to set: no empty call


async def test_reset_switches_off_only_what_was_on() -> None:
    mon = FakeMonitor()
    await params.reset(mon.as_monitor(), F.LIVE | F.POSTCOPY, source=True)
    assert caps(mon) == {"return-path": False, "postcopy-ram": False}


async def test_apply_passes_qemus_refusal_on() -> None:
    mon = FakeMonitor()
    mon.fail("migrate-set-capabilities", "Postcopy is not supported")
    with pytest.raises(VmferryError) as err:
        await params.apply(mon.as_monitor(), MigrationParams(), F.POSTCOPY, source=True)
    assert err.value.code is ErrorCode.QEMU_FAILED
    assert mon.commands() == ["migrate-set-capabilities"]  # nothing after the refusal


# -- the policy engine's start and end -----------------------------------------------------------


def engine(
    mon: FakeMonitor, policy: str, *, flags: F = F.LIVE, cap_bps: float = 0.0, memory: int = GIB
) -> Engine:
    dom = cast(QemuDomain, SimpleNamespace(name="g1", monitor=mon.as_monitor()))
    return Engine(
        dom,
        load_policy(policy),
        Contract(downtime_target_ms=120),
        flags,
        bandwidth_cap_bps=cap_bps,
        memory_bytes=memory,
    )


async def test_adaptive_start_sets_the_target_parks_the_throttle_and_close_restores() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    mon.fail("calc-dirty-rate", "no dirty-rate support")  # the preflight is optional
    eng = engine(mon, "vmferry", cap_bps=100 * MIB)  # a 10 s first pass: preflight useful
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    assert mon.commands() == [
        "query-migrate-parameters",
        "migrate-set-capabilities",
        "migrate-set-parameters",
        "calc-dirty-rate",
    ]
    assert caps(mon) == {"auto-converge": True}
    assert mon.args_of("migrate-set-parameters")[0] == {
        "downtime-limit": BULK_PASS_LIMIT_MS,  # the target (120) once the bulk pass is over
        **QEMU_THROTTLE,
        "throttle-trigger-threshold": 100,  # dormant until the policy wants a throttle
    }
    assert eng.limit_ms == 120 and eng.dormant and eng.throttle_usable
    assert [a["action"] for a in eng.actions] == ["downtime"]
    await eng.close()
    # what QEMU had before, including its throttle defaults (the query had none)
    assert mon.args_of("migrate-set-parameters")[-1] == {"downtime-limit": 300, **QEMU_THROTTLE}


async def test_adaptive_skips_the_preflight_on_a_short_first_pass() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    eng = engine(mon, "vmferry", flags=F.LIVE | F.AUTO_CONVERGE, memory=64 * MIB)
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    # auto-converge already on (the flag): no capability call; unlimited link: no preflight
    assert mon.commands() == ["query-migrate-parameters", "migrate-set-parameters"]
    assert mon.args_of("migrate-set-parameters") == [{"downtime-limit": BULK_PASS_LIMIT_MS}]


async def test_adaptive_keeps_qemu_from_switching_over_in_the_bulk_pass() -> None:
    # QEMU would stop the guest ~0.1 s into the first pass, most of the RAM not sent yet.
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    mon.always("query-migrate", {"status": "active", "ram": {"remaining": GIB, "mbps": 800.0}})
    eng = engine(mon, "vmferry", flags=F.LIVE | F.AUTO_CONVERGE, memory=64 * MIB)
    progress = SimpleNamespace(iteration=1, status=MigrationStatus.ACTIVE)
    eng.dom.migration = progress  # type: ignore[misc]
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    assert mon.args_of("migrate-set-parameters") == [{"downtime-limit": BULK_PASS_LIMIT_MS}]
    await eng.step()  # pass 1 (ticks): the limit stays low
    assert len(mon.args_of("migrate-set-parameters")) == 1
    assert eng.summary()["policy_downtime_limit_ms"] == 120  # the contract's, as planned
    progress.iteration = 2  # MIGRATION_PASS 2: the bulk pass is over
    await eng.step()
    assert mon.args_of("migrate-set-parameters")[-1] == {"downtime-limit": 120}
    assert mon.commands()[-2:] == ["migrate-set-parameters", "query-migrate"]  # raised first
    progress.iteration = 3
    await eng.step()  # once is enough
    limits = [a for a in mon.args_of("migrate-set-parameters") if "downtime-limit" in a]
    assert len(limits) == 2
    # the raise is the plan, not an action of its own (the stall here got a throttle)
    assert [a["action"] for a in eng.actions if a["action"] == "downtime"] == ["downtime"]


async def test_a_throttle_in_the_bulk_pass_brings_the_target_with_it() -> None:
    # A guest that outruns the link: it may switch over at the end of the bulk pass.
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    mon.always("query-migrate", {"status": "active", "ram": {"remaining": GIB, "mbps": 800.0}})
    eng = engine(mon, "vmferry", flags=F.LIVE | F.AUTO_CONVERGE, memory=64 * MIB)
    eng.dom.migration = SimpleNamespace(iteration=1, status=MigrationStatus.ACTIVE)  # type: ignore[misc]
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    await eng._act(mon.as_monitor(), Action("throttle", 40), 1, 0)
    assert mon.args_of("migrate-set-parameters")[-1] == {
        "cpu-throttle-initial": 40,
        "throttle-trigger-threshold": 1,
        "downtime-limit": 120,
    }
    eng.dom.migration.iteration = 2  # type: ignore[attr-defined]
    await eng.step()  # nothing left to raise at the bulk pass's end
    limits = [a for a in mon.args_of("migrate-set-parameters") if "downtime-limit" in a]
    assert [a["downtime-limit"] for a in limits] == [BULK_PASS_LIMIT_MS, 120]


async def test_a_policy_without_the_bulk_pass_limit_sets_the_target_at_once() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    dom = cast(QemuDomain, SimpleNamespace(name="g1", monitor=mon.as_monitor()))
    policy = parse_policy(
        'name = "qemu-rule"\nkind = "adaptive"\n[adaptive]\nbulk_pass_downtime_ms = 0\n'
    )
    eng = Engine(
        dom, policy, Contract(downtime_target_ms=120), F.LIVE | F.AUTO_CONVERGE,
        bandwidth_cap_bps=0.0, memory_bytes=64 * MIB,
    )  # fmt: skip
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    assert mon.args_of("migrate-set-parameters")[0]["downtime-limit"] == 120


async def test_a_target_below_the_bulk_pass_limit_is_set_at_once() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    dom = cast(QemuDomain, SimpleNamespace(name="g1", monitor=mon.as_monitor()))
    tight = Engine(
        dom, load_policy("vmferry"), Contract(downtime_target_ms=20), F.LIVE | F.AUTO_CONVERGE,
        bandwidth_cap_bps=0.0, memory_bytes=64 * MIB,
    )  # fmt: skip
    await tight.start(mon.as_monitor(), explicit_downtime_ms=None)
    assert mon.args_of("migrate-set-parameters") == [{"downtime-limit": 20}]


async def test_schedule_starts_at_its_first_step_unless_the_user_set_a_limit() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    await engine(mon, "nova").start(mon.as_monitor(), explicit_downtime_ms=None)
    assert mon.args_of("migrate-set-parameters") == [{"downtime-limit": 50}]  # 500 ms / 10
    mon2 = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    await engine(mon2, "nova").start(mon2.as_monitor(), explicit_downtime_ms=200)
    assert mon2.commands() == ["query-migrate-parameters"]


async def test_close_after_qemu_died_sends_nothing() -> None:
    mon = FakeMonitor(replies={"query-migrate-parameters": {"downtime-limit": 300}})
    eng = engine(mon, "nova")
    await eng.start(mon.as_monitor(), explicit_downtime_ms=None)
    mon.drop()
    await eng.close()  # no error: the guest is gone, nothing to put back
    assert mon.commands() == ["query-migrate-parameters", "migrate-set-parameters"]
