"""vmferry.failpoints in a real daemon: it refuses bad ones, and an error one fails cleanly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmferry import failpoints
from vmferry.failpoints import ENV_VAR
from vmferry.testing import hosts


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.configure("")


def test_daemon_refuses_unknown_failpoint() -> None:
    with hosts(1) as (h,):
        h.kill()
        h.extra_env = {ENV_VAR: "src-perfrom3-after=exit"}
        with pytest.raises(RuntimeError) as err:
            h.start()
        assert "unknown failpoint 'src-perfrom3-after'" in str(err.value)
        h.extra_env = {}
        h.start()  # and starts without it


@pytest.mark.qemu
def test_error_failpoint_fails_the_migration_cleanly() -> None:
    """An ``error`` at Prepare: the migration fails with the failpoint's message, nothing leaks."""
    from tests.e2e.test_recovery import GUEST, boot, pair, try_migrate, wait_settled

    with pair(dst_env={ENV_VAR: "dst-prepare-after=error"}) as (src, dst):
        boot(src)
        assert try_migrate(src, dst, "v3") == "failpoint dst-prepare-after hit"
        assert wait_settled(src, dst, timeout=5) is src
        with src.client() as c:
            assert c.dominfo(GUEST).state == "running"
