"""Cluster membership and VM leases with the embedded lockspace: real daemons, real QEMU."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate
from vmferry.daemon.lease import LeaseOwner, LockspaceLeases
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.cluster import lease_refused, poll

pytestmark = pytest.mark.qemu


@pytest.fixture
def lockspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfls", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(lockspace: Path) -> Iterator[tuple[Host, Host]]:
    toml = f'[cluster]\nlockspace = "{lockspace}"\nheartbeat_interval = 0.5\n'
    with hosts(2, extra_config=toml, ready_timeout=60) as (a, b):
        yield a, b


def test_double_start_is_refused_across_daemons(cluster: tuple[Host, Host]) -> None:
    a, b = cluster
    vm_uuid = str(uuid.uuid4())
    xml = guest_xml("leased", uuid=vm_uuid)
    first = a.boot_guest("leased", uuid=vm_uuid)
    with a.client() as ca, b.client() as cb:
        qemus_b = len(b.qemu_pids())
        refused = lease_refused(lambda: cb.create(xml))
        assert "host0" in refused.message and a.host_uuid in refused.message
        assert len(b.qemu_pids()) == qemus_b  # no QEMU was even started there
        assert "leased" not in [d.name for d in cb.list_domains(all=True)]
        # A persistent definition on b cannot be started either.
        cb.define(xml)
        lease_refused(lambda: cb.start("leased"))
        assert cb.domstate("leased").state == "shutoff"
        # The guest on a never noticed.
        check_continuity(first, wait_heartbeat(ca, "leased", after=first))
        # A paused guest keeps its lease.
        ca.suspend("leased")
        lease_refused(lambda: cb.start("leased"))
        # Once it stops on a, b may start it, and then a may not.
        ca.destroy("leased")
        cb.start("leased")
        wait_heartbeat(cb, "leased")
        assert "host1" in lease_refused(lambda: ca.create(xml)).message
        cb.destroy("leased")
        cb.undefine("leased")


def test_cluster_list_shows_hosts_and_where_vms_run(cluster: tuple[Host, Host]) -> None:
    a, b = cluster
    a.boot_guest("where")
    with b.client() as cb:
        info = poll(
            lambda: (
                (i := cb.cluster())
                and any(v.name == "where" for v in i.vms)
                and len([h for h in i.hosts if h.state == "up"]) == 2
                and i
            ),
            20,
        )
        assert info, cb.cluster()
        assert info.backend == "lockspace"
        by_name = {h.name: h for h in info.hosts}
        assert by_name["host1"].self and not by_name["host0"].self
        assert by_name["host0"].uri == a.uri and by_name["host0"].uuid == a.host_uuid
        assert by_name["host0"].memory_free_kib > 0 and by_name["host0"].cpus > 0
        (vm,) = [v for v in info.vms if v.name == "where"]
        assert (vm.host, vm.host_uuid, vm.state) == ("host0", a.host_uuid, "running")
    # A daemon that stops beating goes down, and its guests leave the VM list.
    a.kill()
    with b.client() as cb:
        info = poll(
            lambda: (
                (i := cb.cluster())
                and {h.name: h.state for h in i.hosts}.get("host0") == "down"
                and i
            ),
            20,
        )
        assert info, cb.cluster()
        assert not [v for v in info.vms if v.name == "where"]


def _migrate(src: Host, dst: Host, name: str) -> MigrationReport:
    async def go() -> MigrationReport:
        async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
            return await migrate(s, d, name, MigrateFlags.LIVE)

    return asyncio.run(go())


def test_the_lease_follows_the_guest_when_it_migrates(cluster: tuple[Host, Host]) -> None:
    a, b = cluster
    vm_uuid = str(uuid.uuid4())
    before = a.boot_guest("mover", uuid=vm_uuid)
    _migrate(a, b, "mover")
    with a.client() as ca, b.client() as cb:
        after = wait_heartbeat(cb, "mover", after=before)
        check_continuity(before, after)
        # The lease went with it: a may not start its copy now.
        xml = guest_xml("mover", uuid=vm_uuid)
        assert "host1" in lease_refused(lambda: ca.create(xml)).message
    _migrate(b, a, "mover")  # and back
    with a.client() as ca, b.client() as cb:
        check_continuity(after, wait_heartbeat(ca, "mover", after=after))
        assert "host0" in lease_refused(lambda: cb.create(xml)).message
        ca.destroy("mover")


def test_source_resumes_only_with_its_lease_back(lockspace: Path, tmp: Path) -> None:
    """The destination cannot take the lease in Finish (a third host took it after the
    source let go): the guest is not resumed there, and the source waits for its lease."""
    toml = f'[cluster]\nlockspace = "{lockspace}"\nheartbeat_interval = 0.5\n'
    envs = [
        {},
        {"VMFERRY_FAILPOINTS": "dst-finish-before=pause", "VMFERRY_FAILPOINTS_DIR": str(tmp)},
    ]
    with hosts(2, extra_config=toml, envs=envs, ready_timeout=60) as (a, b):
        vm_uuid = str(uuid.uuid4())
        before = a.boot_guest("contested", uuid=vm_uuid)
        intruder = LockspaceLeases(lockspace, LeaseOwner(str(uuid.uuid4()), "intruder"))
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_migrate, a, b, "contested")
            assert poll(lambda: (tmp / "dst-finish-before.hit").exists(), 120)
            asyncio.run(intruder.acquire(vm_uuid, "contested"))  # the source released it
            (tmp / "dst-finish-before.release").touch()
            with pytest.raises(VmferryError) as failed:
                running.result(timeout=120)
        assert failed.value.code == ErrorCode.LEASE_HELD, failed.value
        with a.client() as ca, b.client() as cb:
            assert "contested" not in [d.name for d in cb.list_domains(all=True)]
            state = ca.domstate("contested")
            assert (state.state, state.reason) == ("paused", "lease-lost")
            assert "intruder" in lease_refused(lambda: ca.resume("contested")).message
            intruder.release(vm_uuid)
            ca.resume("contested")
            check_continuity(before, wait_heartbeat(ca, "contested", after=before))
            ca.destroy("contested")


def test_failed_finish_gives_the_lease_back_to_the_source(lockspace: Path) -> None:
    toml = f'[cluster]\nlockspace = "{lockspace}"\nheartbeat_interval = 0.5\n'
    envs = [{}, {"VMFERRY_FAILPOINTS": "dst-finish-before=error"}]
    with hosts(2, extra_config=toml, envs=envs, ready_timeout=60) as (a, b):
        vm_uuid = str(uuid.uuid4())
        before = a.boot_guest("stays", uuid=vm_uuid)
        with pytest.raises(VmferryError):
            _migrate(a, b, "stays")
        with a.client() as ca, b.client() as cb:
            assert ca.domstate("stays").state == "running"
            check_continuity(before, wait_heartbeat(ca, "stays", after=before))
            lease_refused(lambda: cb.create(guest_xml("stays", uuid=vm_uuid)))
            ca.destroy("stays")


def test_the_lease_outlives_a_killed_daemon(cluster: tuple[Host, Host]) -> None:
    """The lock is shared with QEMU: while the daemon is dead, no other host may start the guest;
    the restarted daemon takes the lock back from its QEMU, and can hand it over again."""
    a, b = cluster
    vm_uuid = str(uuid.uuid4())
    xml = guest_xml("survivor", uuid=vm_uuid)
    before = a.boot_guest("survivor", uuid=vm_uuid)
    a.kill()
    with b.client() as cb:
        assert "host0" in lease_refused(lambda: cb.create(xml)).message
    a.start(timeout=60)
    with a.client() as ca:
        assert ca.domstate("survivor").state == "running"
        check_continuity(before, wait_heartbeat(ca, "survivor", after=before))
    _migrate(a, b, "survivor")  # the re-adopted lock is released for the hand-over
    # The destination took the lock in Finish and gave its QEMU a copy (QMP getfd): it too
    # outlives its daemon.
    b.kill()
    with a.client() as ca:
        assert "host1" in lease_refused(lambda: ca.create(xml)).message
    b.start(timeout=60)
    with b.client() as cb:
        wait_heartbeat(cb, "survivor", after=before)
        cb.destroy("survivor")
    with a.client() as ca:
        ca.create(xml)  # free once its QEMU is gone
        ca.destroy("survivor")
