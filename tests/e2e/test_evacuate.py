"""Evacuation and maintenance with real daemons and real QEMU (issue 9 §3/§4)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.api.models import EvacuateRequest, EvacuationInfo
from vmferry.client import Client
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

pytestmark = pytest.mark.qemu

GUESTS = ("ev0", "ev1", "ev2")


@pytest.fixture
def lockspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfev", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cluster(lockspace: Path, count: int) -> Any:
    toml = f'[cluster]\nlockspace = "{lockspace}"\nheartbeat_interval = 0.5\n'
    return hosts(count, extra_config=toml)


def _wait(check: Callable[[], Any], timeout: float = 120.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.3)


def _peers_up(client: Client, count: int) -> bool:
    return sum(1 for h in client.cluster().hosts if h.state == "up" and h.uri) >= count


def _boot(a: Host) -> dict[str, Heartbeat]:
    return {g: a.boot_guest(g, memory_mib=128, stamp_mib=16, dirty_mib_s=2) for g in GUESTS}


def _finished(client: Client) -> EvacuationInfo | None:
    info = client.evacuation()
    return info if info.state == "done" else None


def _where(hs: list[Host], name: str) -> Host | None:
    for h in hs:
        with h.client() as c:
            if name in [d.name for d in c.list_domains()]:
                return h
    return None


def test_maintenance_refuses_incoming_and_new_domains(lockspace: Path) -> None:
    with _cluster(lockspace, 2) as (a, b):
        first = a.boot_guest("mt", memory_mib=128, stamp_mib=16)
        with a.client() as ca, b.client() as cb:
            assert not cb.maintenance().on
            assert cb.set_maintenance(True, "kernel update").on
            with pytest.raises(VmferryError) as refused:
                cb.create(guest_xml("fresh"))
            assert refused.value.code == ErrorCode.HOST_MAINTENANCE
            assert "host1" in refused.value.message and "kernel update" in refused.value.message
            assert "fresh" not in [d.name for d in cb.list_domains(all=True)]
            with pytest.raises(VmferryError) as refused:
                ca.run(_p2p_call("mt", b.uri))
            assert refused.value.code == ErrorCode.HOST_MAINTENANCE
            # The guest stays, running, on a.
            check_continuity(first, after := wait_heartbeat(ca, "mt", after=first))
        # Persisted: a restarted daemon is still in maintenance.
        b.kill(signal.SIGTERM)
        b.start()
        with a.client() as ca, b.client() as cb:
            assert cb.maintenance().on and cb.maintenance().reason == "kernel update"
            assert not cb.set_maintenance(False).on
            ca.run(_p2p_call("mt", b.uri))
            check_continuity(after, wait_heartbeat(cb, "mt", after=after))


def _cli(host: Host, *argv: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "-c", host.uri, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _runs_on(host: Host, hs: list[Host], name: str, before: Heartbeat) -> None:
    """*name* runs on *host* (only), its memory intact since *before*."""
    assert _where(hs, name) is host, f"{name} is not on {host.name}"
    with host.client() as c:
        assert c.domstate(name).state == "running"
        check_continuity(before, wait_heartbeat(c, name, after=before))


def _all_arrived(hs: list[Host], info: EvacuationInfo, before: dict[str, Heartbeat]) -> None:
    by_name = {h.name: h for h in hs}
    for m in info.moves:
        assert m.result == "done" and m.wall_s > 0 and m.downtime_ms is not None, m
        _runs_on(by_name[m.dest], hs, m.name, before[m.name])


def _p2p_call(name: str, dest: str) -> Any:
    from vmferry.client import migration_calls as mc

    return mc.migrate_p2p(name, dest, int(MigrateFlags.LIVE | MigrateFlags.PEER2PEER), {})


def test_evacuate_three_guests_to_two_hosts(lockspace: Path) -> None:
    with _cluster(lockspace, 3) as hs:
        a = hs[0]
        before = _boot(a)
        with a.client() as ca:
            _wait(lambda: _peers_up(ca, 2), 30, "b and c in the cluster")
            plan = ca.evacuate(EvacuateRequest(dry_run=True, bandwidth_mib_s=200))
            assert plan.state == "planned"
            assert sorted(m.name for m in plan.moves) == list(GUESTS)
            assert {m.dest for m in plan.moves} == {"host1", "host2"}
            assert [m.order for m in plan.moves] == [1, 2, 3]
            assert not ca.maintenance().on  # a dry run changes nothing
            # The CLI: plan, then drain, following it to the final table.
            shown = _cli(a, "evacuate", "host0", "--dry-run", "--bandwidth", "200")
            assert "Evacuation plan of host0: 3 guests" in shown and "ev0" in shown
            table = _cli(a, "evacuate", "host0", "--bandwidth", "200", timeout=300)
            assert ca.maintenance().on
            info = _wait(lambda: _finished(ca), 60, "the drain")
            assert ca.list_domains() == []
            for m in info.moves:
                # The last line naming it: the final table (progress lines come before).
                row = [line for line in table.splitlines() if line.split()[:1] == [m.name]][-1]
                assert m.dest in row and row.rstrip().endswith("done")
        _all_arrived(hs, info, before)


def test_a_destination_dying_midway_leaves_its_guest_on_the_source(lockspace: Path) -> None:
    with _cluster(lockspace, 3) as hs:
        a, b, c = hs
        before = _boot(a)
        with a.client() as ca:
            _wait(lambda: _peers_up(ca, 2), 30, "b and c in the cluster")
            # Slow links, one at a time: c dies while a guest is on its way there (in
            # pre-copy: killed after the switchover, nobody could tell where the guest runs and
            # the source would rightly stay paused).
            ca.evacuate(EvacuateRequest(bandwidth_mib_s=4, max_parallel=1))

            def to_c_running() -> bool:
                return any(
                    m.dest == "host2" and m.result == "running" and m.progress < 0.7
                    for m in ca.evacuation().moves
                )

            _wait(to_c_running, 240, "a migration to host2 under way")
            c.kill(signal.SIGKILL)
            info = _wait(lambda: _finished(ca), 300, "the drain")
        failed = [m for m in info.moves if m.result == "failed"]
        done = [m for m in info.moves if m.result == "done"]
        assert failed and done, info
        assert all(m.dest == "host1" for m in done)
        for m in done:
            _runs_on(b, [a, b], m.name, before[m.name])
        for m in failed:
            _runs_on(a, [a, b], m.name, before[m.name])


def test_a_restart_of_the_source_mid_drain_resumes(lockspace: Path) -> None:
    with _cluster(lockspace, 3) as hs:
        a = hs[0]
        before = _boot(a)
        with a.client() as ca:
            _wait(lambda: _peers_up(ca, 2), 30, "b and c in the cluster")
            ca.evacuate(EvacuateRequest(bandwidth_mib_s=16, max_parallel=1))
            first = _wait(
                lambda: [m for m in ca.evacuation().moves if m.result == "done"], 240, "one done"
            )[0]
        a.kill(signal.SIGTERM)
        a.start()
        with a.client() as ca:
            info = _wait(lambda: _finished(ca), 300, "the resumed drain")
            assert ca.list_domains() == []
        by_name = {m.name: m for m in info.moves}
        assert by_name[first.name].wall_s == first.wall_s  # not moved again
        _all_arrived(hs, info, before)
