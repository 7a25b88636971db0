"""A destination daemon that dies after the post-copy switch, before Finish, while QEMU completes.

The stream of a post-copy migration goes on without the daemons. If the destination's
daemon is down until QEMU has received the last page, its restart finds an incoming guest
that is paused, never resumed by Finish, with QEMU's status ``completed``. The source's copy
is stale since the switch, so killing this guest (the pre-copy rule for finish3) would lose
the VM: the destination must remember the switch (reason ``post-copy``) and complete it.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.test_postcopy import BANDWIDTH, GUEST, POSTCOPY, Background, _check_arrived, _wait
from vmferry.client import AsyncClient, Client
from vmferry.client.migrate import MigrationReport, migrate_p2p
from vmferry.failpoints import DIR_ENV, ENV_VAR
from vmferry.migration.params import MigrationParams
from vmferry.testguest import guest_xml
from vmferry.testing import hosts, wait_heartbeat

pytestmark = pytest.mark.qemu


def _qemu_status(src: Client, name: str) -> str:
    """QEMU's status on the source: ``completed`` once the last page went out."""
    return str(src.jobinfo(name).stats.get("status", "none"))


def test_destination_restart_after_postcopy_completed_keeps_the_guest() -> None:
    with hosts(2) as (a, b):
        hits = b.root / "failpoints"
        hits.mkdir()
        b.extra_env.update({ENV_VAR: "dst-finish-before=pause", DIR_ENV: str(hits)})
        b.kill()
        b.start()
        with a.client() as src, b.client() as dst:
            src.create(guest_xml("pcr", **GUEST))  # type: ignore[arg-type]
            before = wait_heartbeat(src, "pcr")

            async def run() -> MigrationReport:
                async with AsyncClient(a.uri) as s:
                    params = MigrationParams(bandwidth_mib_s=BANDWIDTH, postcopy_after_precopy=True)
                    return await migrate_p2p(s, b.uri, "pcr", POSTCOPY, params)

            job = Background(run)
            _wait("Finish to reach its failpoint", (hits / "dst-finish-before.hit").exists, 90)
            # Finish never resumed the guest; QEMU receives the rest of the pages by itself.
            _wait(
                "QEMU to complete the stream",
                lambda: _qemu_status(src, "pcr") == "completed",
                90,
            )
            assert dst.domstate("pcr").state == "paused"
        b.kill(signal.SIGKILL)
        b.extra_env.pop(ENV_VAR)
        b.start()
        job.join()
        with a.client() as src, b.client() as dst:
            _check_arrived(src, dst, "pcr", before)
            time.sleep(0.5)
            assert dst.dominfo("pcr").state == "running"
