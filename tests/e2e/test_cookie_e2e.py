"""Hostile migration cookies against real daemons: the guest stays intact and manageable."""

from __future__ import annotations

import asyncio
import re

import pytest

from vmferry.client import AsyncClient
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import RemoteDestination, RemoteSource, open_session
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import Heartbeat, check_continuity
from vmferry.testing import Host, wait_heartbeat

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE


def _nan_downtime(cookie: str) -> str:
    """The cookie with ``<downtime>nan</downtime>`` in its statistics."""
    cookie, n = re.subn(r"<downtime>[^<]*</downtime>", "<downtime>nan</downtime>", cookie)
    if not n:
        cookie, n = re.subn(r"<statistics>", "<statistics><downtime>nan</downtime>", cookie)
    if not n:
        cookie = cookie.replace(
            "</qemu-migration>",
            "<statistics><downtime>nan</downtime></statistics></qemu-migration>",
        )
    assert "<downtime>nan</downtime>" in cookie
    return cookie


def _assert_only_on(host: Host, other: Host, name: str, before: Heartbeat) -> Heartbeat:
    with host.client() as c, other.client() as o:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == ("running", "none"), info
        assert name not in [d.name for d in o.list_domains(all=True)]
        after = wait_heartbeat(c, name, after=before)
        check_continuity(before, after)
        # still manageable: a state change goes through
        c.suspend(name)
        assert c.dominfo(name).state == "paused"
        c.resume(name)
    return after


async def _hop(src: Host, dst: Host, name: str, *, finish_nan: bool, confirm_nan: bool) -> None:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        async with open_session(s) as ss, open_session(d) as ds:
            source, dest = RemoteSource(s, ss), RemoteDestination(d, ds)
            xml, cookie = await source.begin(name, LIVE, MigrationParams())
            uri, cookie = await dest.prepare(xml, cookie, LIVE, MigrationParams())
            cookie = await source.perform(name, cookie, uri)
            if finish_nan:
                cookie = _nan_downtime(cookie)
            cookie = await dest.finish(name, cookie, cancelled=False, v3=True)
            if confirm_nan:
                cookie = _nan_downtime(cookie)
            await source.confirm(name, cookie, cancelled=False)


def test_nan_statistic_at_finish_and_confirm(pair: tuple[Host, Host]) -> None:
    """Finish and Confirm used to crash on int(nan), Finish after the guest resumed."""
    a, b = pair
    hb = a.boot_guest("nanck")
    asyncio.run(_hop(a, b, "nanck", finish_nan=True, confirm_nan=False))
    hb = _assert_only_on(b, a, "nanck", hb)
    asyncio.run(_hop(b, a, "nanck", finish_nan=False, confirm_nan=True))
    _assert_only_on(a, b, "nanck", hb)
    with a.client() as c:
        assert c.run(mc.jobinfo("nanck", completed=True)).type == "completed"
        c.destroy("nanck")


def test_upper_case_local_host_uuid_is_the_same_host(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("upper")

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            async with open_session(s) as ss, open_session(d) as ds:
                source, dest = RemoteSource(s, ss), RemoteDestination(d, ds)
                xml, cookie = await source.begin("upper", LIVE, MigrationParams())
                forged = cookie.replace(a.host_uuid, b.host_uuid.upper())
                assert forged != cookie
                with pytest.raises(VmferryError) as err:
                    await dest.prepare(xml, forged, LIVE, MigrationParams())
                assert err.value.code == ErrorCode.OPERATION_INVALID
                assert "same host" in err.value.message
                await source.confirm("upper", "", cancelled=True)

    asyncio.run(run())
    assert b.qemu_pids() == []
    _assert_only_on(a, b, "upper", hb)
    with a.client() as c:
        c.destroy("upper")


def test_malformed_cookie_at_finish_is_a_clear_error(pair: tuple[Host, Host]) -> None:
    """It used to be parsed for the name before any check: a generic 500."""
    a, b = pair
    hb = a.boot_guest("badfin")

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            async with open_session(s) as ss, open_session(d) as ds:
                source, dest = RemoteSource(s, ss), RemoteDestination(d, ds)
                xml, cookie = await source.begin("badfin", LIVE, MigrationParams())
                uri, cookie = await dest.prepare(xml, cookie, LIVE, MigrationParams())
                await source.perform("badfin", cookie, uri)
                with pytest.raises(VmferryError) as err:
                    await dest.finish("badfin", "<qemu-migration><name>", cancelled=False, v3=True)
                assert err.value.code == ErrorCode.INVALID_ARG
                assert "malformed migration cookie" in err.value.message
                await source.confirm("badfin", "", cancelled=True)

    asyncio.run(run())
    _assert_only_on(a, b, "badfin", hb)
    with a.client() as c:
        c.destroy("badfin")


def test_finish_checks_the_name_prepare_recorded(pair: tuple[Host, Host]) -> None:
    """Finish used to read the expected name from the very cookie it was checking."""
    a, b = pair
    hb = a.boot_guest("fname")

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            async with open_session(s) as ss, open_session(d) as ds:
                source, dest = RemoteSource(s, ss), RemoteDestination(d, ds)
                xml, cookie = await source.begin("fname", LIVE, MigrationParams())
                uri, cookie = await dest.prepare(xml, cookie, LIVE, MigrationParams())
                cookie = await source.perform("fname", cookie, uri)
                forged = cookie.replace("<name>fname</name>", "<name>other</name>")
                assert forged != cookie
                with pytest.raises(VmferryError) as err:
                    await dest.finish("fname", forged, cancelled=False, v3=True)
                assert err.value.code == ErrorCode.INVALID_ARG
                assert "unexpected name other vs fname" in err.value.message
                await source.confirm("fname", "", cancelled=True)

    asyncio.run(run())
    _assert_only_on(a, b, "fname", hb)
    with a.client() as c:
        c.destroy("fname")
