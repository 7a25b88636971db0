"""Migrations converge by default (issue 10 §2): a plain live migration, no contract named."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from vmferry.cli import migrate_cmds
from vmferry.client import AsyncClient
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import MigrationReport, migrate
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, wait_heartbeat
from vmferry.testing.steps import assert_only_on

#: The link; the guest dirties 4x as fast (its 32 MiB working set: QEMU alone stalls at ~1 s).
LINK_MIB_S = 32
DIRTY_MIB_S = 4 * LINK_MIB_S
#: The budget of the QEMU-behaviour run is what the default run took, and never less than this.
MIN_BUDGET_S = 15.0
#: Far beyond the automatic deadline (60 s for this guest): a migration still running is stuck.
HANG_S = 300.0


async def _migrate(src: Host, dst: Host, name: str, params: MigrationParams) -> MigrationReport:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        return await migrate(s, d, name, MigrateFlags.LIVE, params)


@pytest.mark.qemu
def test_plain_live_migration_converges_and_policy_none_does_not(
    pair: tuple[Host, Host],
) -> None:
    a, b = pair
    with a.client() as c:
        c.create(guest_xml("conv", dirty_mib_s=DIRTY_MIB_S))
        before = wait_heartbeat(c, "conv")

    # No policy, no target, no deadline: the daemon's [migration] defaults apply.
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plain = pool.submit(
            asyncio.run, _migrate(a, b, "conv", MigrationParams(bandwidth_mib_s=LINK_MIB_S))
        )
        try:
            report = plain.result(timeout=HANG_S)
        except TimeoutError:
            with a.client() as c:
                c.jobabort("conv")
            raise AssertionError(f"a plain live migration still ran after {HANG_S} s") from None
    took = time.monotonic() - started
    with b.client() as c:
        after = wait_heartbeat(c, "conv", after=before)
        check_continuity(before, after)
    with a.client() as c:
        job = c.run(mc.jobinfo("conv", completed=True))
    stats = job.stats
    assert job.type == "completed"
    assert stats["policy"] == "vmferry" and stats["policy_contract"] == "default"
    assert stats["policy_downtime_target_ms"] == 300 and stats["policy_deadline_auto"] is True
    assert stats["policy_deadline_s"] >= 60  # the automatic deadline's floor
    kinds = [x["action"] for x in stats["policy_actions"]]
    assert {"throttle", "downtime"} & set(kinds[1:]), stats["policy_actions"]
    if "downtime" not in kinds[1:]:  # it got there by throttling: within the target
        assert stats["downtime_ms"] <= 300 + 200, stats
    # Both downtimes in the completed stats, and in what the client reports.
    assert isinstance(stats["guest_downtime_ms"], int) and stats["guest_downtime_ms"] >= 0
    assert isinstance(stats["downtime_ms"], int)
    assert report.stats["guest_downtime_ms"] == stats["guest_downtime_ms"]
    text = migrate_cmds.job_info(job)
    assert "Guest downtime:" in text and "Contract:" in text and "default" in text

    # The same guest and link under QEMU's and libvirt's behaviour: it does not converge.
    budget = max(took, MIN_BUDGET_S)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            asyncio.run,
            _migrate(b, a, "conv", MigrationParams(bandwidth_mib_s=LINK_MIB_S, policy="none")),
        )
        done, _ = concurrent.futures.wait([running], timeout=budget)
        assert not done, "policy none converged by itself: the test guest no longer outruns"
        with b.client() as c:
            live = c.run(mc.jobinfo("conv"))
            assert live.type == "unbounded" and live.stats["policy"] == "none"
            assert live.stats["policy_contract"] == "request"
            assert "policy_deadline_s" not in live.stats  # no default deadline for "none"
            assert live.stats.get("policy_converges") is False, live.stats
            assert "Policy choice:" in migrate_cmds.job_info(live)
            c.jobabort("conv")
        with pytest.raises(VmferryError) as err:
            running.result(timeout=60)
    assert err.value.code == ErrorCode.OPERATION_ABORTED, err.value.message
    # The source runs on, its memory intact; the destination kept nothing.
    assert_only_on(b, a, "conv", after)
    with b.client() as c:
        c.destroy("conv")
