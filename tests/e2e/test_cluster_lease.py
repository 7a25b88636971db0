"""Cluster membership and VM leases with the embedded lockspace: real daemons, real QEMU."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.errors import ErrorCode, VmferryError
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

pytestmark = pytest.mark.qemu


@pytest.fixture
def lockspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfls", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(lockspace: Path) -> Iterator[tuple[Host, Host]]:
    toml = f'[cluster]\nlockspace = "{lockspace}"\nheartbeat_interval = 0.5\n'
    with hosts(2, extra_config=toml) as (a, b):
        yield a, b


def _wait_for(check, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_double_start_is_refused_across_daemons(cluster: tuple[Host, Host]) -> None:
    a, b = cluster
    vm_uuid = str(uuid.uuid4())
    xml = guest_xml("leased", uuid=vm_uuid)
    first = a.boot_guest("leased", uuid=vm_uuid)
    with a.client() as ca, b.client() as cb:
        qemus_b = len(b.qemu_pids())
        with pytest.raises(VmferryError) as refused:
            cb.create(xml)
        assert refused.value.code == ErrorCode.LEASE_HELD
        assert "host0" in refused.value.message and a.host_uuid in refused.value.message
        assert len(b.qemu_pids()) == qemus_b  # no QEMU was even started there
        assert "leased" not in [d.name for d in cb.list_domains(all=True)]
        # A persistent definition on b cannot be started either.
        cb.define(xml)
        with pytest.raises(VmferryError) as refused:
            cb.start("leased")
        assert refused.value.code == ErrorCode.LEASE_HELD
        assert cb.domstate("leased").state == "shutoff"
        # The guest on a never noticed.
        check_continuity(first, wait_heartbeat(ca, "leased", after=first))
        # A paused guest keeps its lease.
        ca.suspend("leased")
        with pytest.raises(VmferryError) as refused:
            cb.start("leased")
        assert refused.value.code == ErrorCode.LEASE_HELD
        # Once it stops on a, b may start it, and then a may not.
        ca.destroy("leased")
        cb.start("leased")
        wait_heartbeat(cb, "leased")
        with pytest.raises(VmferryError) as refused:
            ca.create(xml)
        assert refused.value.code == ErrorCode.LEASE_HELD
        assert "host1" in refused.value.message
        cb.destroy("leased")
        cb.undefine("leased")


def test_cluster_list_shows_hosts_and_where_vms_run(cluster: tuple[Host, Host]) -> None:
    a, b = cluster
    a.boot_guest("where")
    with b.client() as cb:
        info = _wait_for(
            lambda: (i := cb.cluster())
            and any(v.name == "where" for v in i.vms)
            and len([h for h in i.hosts if h.state == "up"]) == 2
            and i
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
        info = _wait_for(
            lambda: (i := cb.cluster())
            and {h.name: h.state for h in i.hosts}.get("host0") == "down"
            and i
        )
        assert info, cb.cluster()
        assert not [v for v in info.vms if v.name == "where"]
