"""Hostile migration cookies against real daemons: the guest stays intact and manageable."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from vmferry.client import migration_calls as mc
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testing import Host
from vmferry.testing.steps import assert_only_on, migration_steps

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


async def _hop(src: Host, dst: Host, name: str, *, finish_nan: bool, confirm_nan: bool) -> None:
    async with migration_steps(src, dst) as (_, _, source, dest):
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
    hb = assert_only_on(b, a, "nanck", hb, manageable=True)
    asyncio.run(_hop(b, a, "nanck", finish_nan=False, confirm_nan=True))
    assert_only_on(a, b, "nanck", hb, manageable=True)
    with a.client() as c:
        assert c.run(mc.jobinfo("nanck", completed=True)).type == "completed"
        c.destroy("nanck")


def test_upper_case_local_host_uuid_is_the_same_host(pair: tuple[Host, Host]) -> None:
    a, b = pair
    hb = a.boot_guest("upper")

    async def run() -> None:
        async with migration_steps(a, b) as (_, _, source, dest):
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
    assert_only_on(a, b, "upper", hb, manageable=True)
    with a.client() as c:
        c.destroy("upper")


def _malformed(cookie: str) -> str:
    return "<qemu-migration><name>"


def _renamed(cookie: str) -> str:
    forged = cookie.replace("<name>cfin</name>", "<name>other</name>")
    assert forged != cookie
    return forged


@pytest.mark.parametrize(
    ("forge", "words"),
    [
        # it used to be parsed for the name before any check: a generic 500
        (_malformed, "malformed migration cookie"),
        # Finish used to read the expected name from the very cookie it was checking
        (_renamed, "unexpected name other vs cfin"),
    ],
    ids=["malformed", "renamed"],
)
def test_forged_cookie_at_finish_is_a_clear_error(
    pair: tuple[Host, Host], forge: Callable[[str], str], words: str
) -> None:
    a, b = pair
    hb = a.boot_guest("cfin")

    async def run() -> None:
        async with migration_steps(a, b) as (_, _, source, dest):
            xml, cookie = await source.begin("cfin", LIVE, MigrationParams())
            uri, cookie = await dest.prepare(xml, cookie, LIVE, MigrationParams())
            cookie = await source.perform("cfin", cookie, uri)
            with pytest.raises(VmferryError) as err:
                await dest.finish("cfin", forge(cookie), cancelled=False, v3=True)
            assert err.value.code == ErrorCode.INVALID_ARG
            assert words in err.value.message
            await source.confirm("cfin", "", cancelled=True)

    asyncio.run(run())
    assert_only_on(a, b, "cfin", hb, manageable=True)
    with a.client() as c:
        c.destroy("cfin")
