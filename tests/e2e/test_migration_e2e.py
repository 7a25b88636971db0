"""Live migration end to end: two real vmferryd, real QEMU, guest memory checked after each hop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from vmferry.client import AsyncClient, Client
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.steps import assert_only_on, migration_steps

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _migrate(
    src: Host,
    dst: Host,
    name: str,
    flags: MigrateFlags = LIVE,
    params: MigrationParams | None = None,
    version: int | None = None,
) -> MigrationReport:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        return await migrate(s, d, name, flags, params, version=version)


async def _p2p(
    src: Host,
    dst: Host,
    name: str,
    flags: MigrateFlags = LIVE,
    params: MigrationParams | None = None,
) -> MigrationReport:
    async with AsyncClient(src.uri) as s:
        return await migrate_p2p(s, dst.uri, name, flags, params)


def _cleanup(host: Host, name: str) -> None:
    with host.client() as c:
        for d in c.list_domains(all=True):
            if d.name == name:
                if d.state != "shutoff":
                    c.destroy(name)
                if d.persistent:
                    c.undefine(name)


def test_v3_v2_and_p2p_hops_keep_memory_intact(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("hop")
    report = _run(_migrate(a, b, "hop"))
    assert set(report.steps) == {"begin", "prepare", "perform", "finish", "confirm"}
    assert report.stats["downtime_ms"] >= 0 and report.stats["data_processed"] > 0  # type: ignore[operator]
    hb = assert_only_on(b, a, "hop", hb)
    report = _run(_migrate(b, a, "hop", version=2))
    assert set(report.steps) == {"prepare", "perform", "finish"}
    hb = assert_only_on(a, b, "hop", hb)
    report = _run(_p2p(a, b, "hop"))
    hb = assert_only_on(b, a, "hop", hb)
    _run(_p2p(b, a, "hop"))
    assert_only_on(a, b, "hop", hb)
    with a.client() as c:
        assert c.run(mc.jobinfo("hop", completed=True)).type == "completed"
    _cleanup(a, "hop")


def test_persistent_undefinesource_and_dname(pair: tuple[Host, Host]) -> None:
    a, b = pair
    with a.client() as c:
        c.define(guest_xml("pers"))
        c.start("pers")
        hb = wait_heartbeat(c, "pers")
    flags = LIVE | MigrateFlags.PERSIST_DEST | MigrateFlags.UNDEFINE_SOURCE
    _run(_migrate(a, b, "pers", flags, MigrationParams(dname="renamed")))
    with b.client() as cb, a.client() as ca:
        info = cb.dominfo("renamed")
        assert info.persistent and info.state == "running"
        assert ca.list_domains(all=True) == []
        after = wait_heartbeat(cb, "renamed", after=hb)
        check_continuity(hb, after)
        cb.destroy("renamed")
        assert cb.dominfo("renamed").state == "shutoff"  # still defined there
        cb.undefine("renamed")


def test_transient_stays_transient_and_source_keeps_definition(pair: tuple[Host, Host]) -> None:
    a, b = pair
    with a.client() as c:
        c.define(guest_xml("keep"))
        c.start("keep")
        hb = wait_heartbeat(c, "keep")
    _run(_migrate(a, b, "keep"))
    with a.client() as ca, b.client() as cb:
        # without --undefinesource the source keeps its (inactive) definition
        assert (ca.dominfo("keep").state, ca.dominfo("keep").reason) == ("shutoff", "migrated")
        assert cb.dominfo("keep").persistent is False
        check_continuity(hb, wait_heartbeat(cb, "keep", after=hb))
    _cleanup(b, "keep")
    _cleanup(a, "keep")


def test_suspend_leaves_guest_paused_on_destination(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("susp")
    _run(_migrate(a, b, "susp", LIVE | MigrateFlags.PAUSED))
    with b.client() as c:
        st = c.domstate("susp")
        assert st.state == "paused"
        c.resume("susp")
        check_continuity(hb, wait_heartbeat(c, "susp", after=hb))
    _cleanup(b, "susp")


def test_offline_moves_the_definition_only(pair: tuple[Host, Host]) -> None:
    a, b = pair
    with a.client() as c:
        c.define(guest_xml("off"))
    flags = MigrateFlags.OFFLINE | MigrateFlags.PERSIST_DEST | MigrateFlags.UNDEFINE_SOURCE
    _run(_migrate(a, b, "off", flags))
    with a.client() as ca, b.client() as cb:
        assert ca.list_domains(all=True) == []
        info = cb.dominfo("off")
        assert (info.state, info.persistent) == ("shutoff", True)
        assert b.qemu_pids() == [] or "off" not in str(b.qemu_pids())
        cb.start("off")
        wait_heartbeat(cb, "off")
    _cleanup(b, "off")


def test_non_live_migration(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("cold")
    _run(_migrate(a, b, "cold", MigrateFlags(0)))
    assert_only_on(b, a, "cold", hb)
    _cleanup(b, "cold")


async def _abort_when_moving(src: Host, dst: Host, name: str, params: MigrationParams) -> None:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        task = asyncio.create_task(migrate(s, d, name, LIVE, params))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            info = await s.run(mc.jobinfo(name))
            if info.stats.get("data_processed", 0):
                break
        assert (await s.run(mc.get_speed(name))).bandwidth_mib_s == params.bandwidth_mib_s
        await s.run(mc.jobabort(name))
        with pytest.raises(VmferryError) as err:
            await task
        assert err.value.code == ErrorCode.OPERATION_ABORTED


def test_abort_resumes_source(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("abrt", dirty_mib_s=16)
    _run(_abort_when_moving(a, b, "abrt", MigrationParams(bandwidth_mib_s=8)))
    assert_only_on(a, b, "abrt", hb)
    with a.client() as c:
        assert c.dominfo("abrt").reason in ("running", "migration-canceled", "booted")
    # and it can be migrated again at once
    _run(_migrate(a, b, "abrt"))
    assert_only_on(b, a, "abrt", hb)
    _cleanup(b, "abrt")


def test_timeout_suspends_a_guest_that_outruns_the_cap(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("busy", dirty_mib_s=64)
    params = MigrationParams(bandwidth_mib_s=32, timeout_suspend_s=2.0)
    report = _run(_migrate(a, b, "busy", LIVE, params))
    assert report.wall_s >= 2.0
    assert_only_on(b, a, "busy", hb)
    _cleanup(b, "busy")


# -- failure branches: the guest ends on exactly one side ------------------------------------


def test_prepare_refused_name_clash(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("clash")
    with b.client() as cb:
        cb.create(guest_xml("clash"))
    with pytest.raises(VmferryError) as err:
        _run(_migrate(a, b, "clash"))
    assert err.value.code == ErrorCode.DOMAIN_EXISTS
    _assert_running_here(a, "clash", hb)
    _cleanup(b, "clash")
    _run(_migrate(a, b, "clash"))
    assert_only_on(b, a, "clash", hb)
    _cleanup(b, "clash")


def test_prepare_refused_bad_dest_xml(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("badxml")
    bad = guest_xml("badxml").replace("<memory unit='MiB'>128", "<memory unit='MiB'>256")
    with pytest.raises(VmferryError) as err:
        _run(_migrate(a, b, "badxml", LIVE, MigrationParams(dest_xml=bad)))
    assert err.value.code in (ErrorCode.CONFIG_UNSUPPORTED, ErrorCode.XML_ERROR)
    _assert_running_here(a, "badxml", hb)
    _cleanup(a, "badxml")


@pytest.mark.parametrize("driver", ["v3", "v2", "p2p"])
def test_perform_fails_when_destination_qemu_dies(pair: tuple[Host, Host], driver: str) -> None:
    a, b = pair
    name = f"dkill{driver}"
    hb = a.boot_guest(name, dirty_mib_s=16)

    async def run() -> None:
        params = MigrationParams(bandwidth_mib_s=8)
        if driver == "p2p":
            task = asyncio.create_task(_p2p(a, b, name, LIVE, params))
        else:
            task = asyncio.create_task(
                _migrate(a, b, name, LIVE, params, version=2 if driver == "v2" else 3)
            )
        deadline = time.monotonic() + 60  # Prepare starts it: seconds under load
        while not b.qemu_pids() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        for pid in b.qemu_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(VmferryError):
            await task

    _run(run())
    assert_only_on(a, b, name, hb)
    _run(_migrate(a, b, name))
    assert_only_on(b, a, name, hb)
    _cleanup(b, name)


def test_prepare_refused_no_free_port(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("noport")
    held = []
    try:
        for port in range(b.port_min, b.port_min + 15):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", port))
            sock.listen()
            held.append(sock)
        with pytest.raises(VmferryError) as err:
            _run(_migrate(a, b, "noport"))
        assert err.value.code == ErrorCode.NO_FREE_PORT
        assert "port_min" in err.value.message
    finally:
        for sock in held:
            sock.close()
    assert_only_on(a, b, "noport", hb)
    _run(_migrate(a, b, "noport"))
    assert_only_on(b, a, "noport", hb)
    _cleanup(b, "noport")


@pytest.mark.parametrize("driver", ["v3", "p2p"])
def test_finish_fails_source_resumes(driver: str) -> None:
    with hosts(2) as (a, b):
        b.kill()
        b.extra_env["VMFERRY_FAILPOINTS"] = "dst-finish-before=error"
        b.start()
        hb = a.boot_guest("fin")
        with pytest.raises(VmferryError) as err:
            _run(_p2p(a, b, "fin") if driver == "p2p" else _migrate(a, b, "fin"))
        assert "failpoint dst-finish-before hit" in err.value.message
        assert_only_on(a, b, "fin", hb)
        assert b.qemu_pids() == []


def test_perform_fails_connection_refused(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("refused")
    params = MigrationParams(migrate_uri="tcp:127.0.0.1:1")
    with pytest.raises(VmferryError) as err:
        _run(_migrate(a, b, "refused", LIVE, params))
    assert "refused" in err.value.message.lower() or err.value.code == ErrorCode.OPERATION_FAILED
    assert_only_on(a, b, "refused", hb)
    _cleanup(a, "refused")


def test_client_gone_after_prepare_destroys_incoming(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("gone")

    async def half_migration() -> None:
        async with migration_steps(a, b) as (_, _, src, dst):
            xml, cookie = await src.begin("gone", LIVE, MigrationParams())
            await dst.prepare(xml, cookie, LIVE, MigrationParams())
            assert len(b.qemu_pids()) == 1
            # both sessions closed here, as if the client died

    _run(half_migration())
    deadline = time.monotonic() + 60  # deadlines only: the daemons act on the closed sessions
    while b.qemu_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.qemu_pids() == []
    with a.client() as c:
        deadline = time.monotonic() + 60
        while c.dominfo("gone").job.async_job != "none" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert_only_on(a, b, "gone", hb)
    _run(_migrate(a, b, "gone"))
    assert_only_on(b, a, "gone", hb)
    _cleanup(b, "gone")


def test_confirm_cancelled_resumes_source(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("cancel")

    async def cancelled_after_perform() -> None:
        async with migration_steps(a, b) as (s, _, src, dst):
            xml, cookie = await src.begin("cancel", LIVE, MigrationParams())
            uri, cookie = await dst.prepare(xml, cookie, LIVE, MigrationParams())
            cookie = await src.perform("cancel", cookie, uri)
            assert (await s.domstate("cancel")).state == "paused"
            await dst.finish("cancel", cookie, cancelled=True, v3=True)
            await src.confirm("cancel", "", cancelled=True)

    _run(cancelled_after_perform())
    assert_only_on(a, b, "cancel", hb)
    _cleanup(a, "cancel")


def test_lock_rules_during_migration(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("lock", dirty_mib_s=16)

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            task = asyncio.create_task(
                migrate(s, d, "lock", LIVE, MigrationParams(bandwidth_mib_s=8))
            )
            # Begin and Prepare (a QEMU start) may take seconds under load: wait for the stream
            # (8 MiB/s against a guest dirtying 16: it does not converge before set_speed 0).
            deadline = time.monotonic() + 60
            while (await s.dominfo("lock")).job.phase != "perform3":
                assert time.monotonic() < deadline, "the migration did not reach Perform"
                if task.done():
                    await task  # failed before: its error says why
                await asyncio.sleep(0.1)
            # queries and tuning get through; a state change waits, then fails with the lock error
            assert (await s.run(mc.jobinfo("lock"))).type == "unbounded"
            await s.run(mc.set_maxdowntime("lock", 500))
            with pytest.raises(VmferryError) as err:
                await s.resume("lock")
            assert err.value.code == ErrorCode.OPERATION_TIMEOUT
            assert "state change lock" in err.value.message
            with pytest.raises(VmferryError) as err:
                await d.run(mc.jobinfo("lock"))
            assert "only on the source" in err.value.message
            await s.run(mc.set_speed("lock", 0))
            await task

    _run(run())
    assert_only_on(b, a, "lock", hb)
    _cleanup(b, "lock")


def _assert_running_here(host: Host, name: str, before: Heartbeat) -> None:
    with host.client() as c:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == ("running", "none"), info
        check_continuity(before, wait_heartbeat(c, name, after=before))


def test_same_host_is_refused(pair: tuple[Host, Host]) -> None:
    a, _ = pair
    hb = a.boot_guest("same")
    with pytest.raises(VmferryError) as err:
        _run(_migrate(a, a, "same"))
    assert "same host" in err.value.message
    _assert_running_here(a, "same", hb)
    with Client(a.uri) as c:
        c.destroy("same")


def test_v2_client_gone_after_perform_keeps_the_only_copy(pair: tuple[Host, Host]) -> None:
    """v2 has no Confirm: once Perform2 killed the source, the destination must not be destroyed."""
    a, b = pair
    hb = a.boot_guest("v2gone")

    async def perform_then_vanish() -> None:
        async with migration_steps(a, b) as (_, _, src, dst):
            xml = await src.dumpxml("v2gone")
            uri, _ = await dst.prepare(xml, None, LIVE, MigrationParams())
            await src.perform2("v2gone", uri, LIVE, MigrationParams())
            # the client dies here, before Finish2

    _run(perform_then_vanish())
    with b.client() as c:
        deadline = time.monotonic() + 60  # a deadline only: the session's close ends the job
        while c.dominfo("v2gone").job.async_job != "none" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert_only_on(b, a, "v2gone", hb)
    _cleanup(b, "v2gone")
