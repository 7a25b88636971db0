"""The virsh verbs beyond the life cycle on real QEMU: reboot, reset, autostart, domstats,
domiflist, vncdisplay, setmem and setmaxmem (one daemon and guest for most of them)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmferry.client import AsyncClient, Client
from vmferry.client.migrate import migrate
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

pytestmark = pytest.mark.qemu

MIB = 1024
MEMORY_MIB = 160
DISK_BYTES = 1 << 20


@dataclass
class DiskHost(Host):
    """A daemon whose [paths] roots also hold ``ROOT/disks`` (a test disk for block stats)."""

    @property
    def disk_dir(self) -> Path:
        return self.root / "disks"

    def config_text(self) -> str:
        return super().config_text().replace("roots = [", f'roots = ["{self.disk_dir}", ', 1)


def verbs_xml(name: str, disk: Path | None = None) -> str:
    """The test guest with a virtio balloon, a user-mode NIC, VNC on loopback and a disk."""
    devices = (
        "<memballoon model='virtio'/>"
        "<interface type='user'><mac address='52:54:00:aa:bb:01'/><model type='virtio'/>"
        "</interface>"
        "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
    )
    if disk is not None:
        devices += f"<disk type='file'><source file='{disk}'/><target dev='vda'/></disk>"
    xml = guest_xml(name, memory_mib=MEMORY_MIB, stamp_mib=16)
    assert "<memballoon model='none'/>" in xml
    return xml.replace("<memballoon model='none'/>", devices)


@pytest.fixture(scope="module")
def host() -> Iterator[DiskHost]:
    with hosts(1, host_type=DiskHost) as (h,):
        assert isinstance(h, DiskHost)
        # QEMU runs as vmferry-qemu: it must reach the disk through these directories
        for d in (h.root.parent, h.root):
            d.chmod(0o711)
        h.disk_dir.mkdir(mode=0o755)
        disk = h.disk_dir / "vda.img"
        disk.write_bytes(b"\0" * DISK_BYTES)
        disk.chmod(0o666)
        with h.client() as c:
            c.define(verbs_xml("v1", disk))
            c.start("v1")
            wait_heartbeat(c, "v1")
        yield h


def test_domiflist_and_vncdisplay(host: DiskHost) -> None:
    with host.client() as c:
        (nic,) = c.interfaces("v1")
        assert (nic.interface, nic.type, nic.model, nic.mac) == (
            "hostnet0",
            "user",
            "virtio",
            "52:54:00:aa:bb:01",
        )
        vnc = c.vncdisplay("v1")
        assert vnc.listen == "127.0.0.1"
        assert 5900 <= vnc.port <= 5999 and vnc.display == vnc.port - 5900
        # something listens there, on loopback only
        with __import__("socket").create_connection(("127.0.0.1", vnc.port), timeout=5) as s:
            assert s.recv(3) == b"RFB"


def test_domstats(host: DiskHost) -> None:
    with host.client() as c:
        before = c.domstats(["v1"])["v1"]
        assert before["state.state"] == "running"
        assert before["balloon.maximum"] == MEMORY_MIB * MIB
        assert before["balloon.current"] == MEMORY_MIB * MIB  # QEMU's actual: nothing taken
        assert before["vcpu.current"] == 1
        assert before["net.count"] == 1 and before["net.0.mac"] == "52:54:00:aa:bb:01"
        assert before["block.count"] == 1 and before["block.0.name"] == "vda"
        assert before["block.0.path"].endswith("vda.img")
        for key in ("rd.reqs", "rd.bytes", "wr.reqs", "wr.bytes", "fl.reqs"):
            assert isinstance(before[f"block.0.{key}"], int)
        assert before["block.0.rd.bytes"] > 0  # the guest kernel read its partition table
        assert before["cpu.time"] > 0
        assert not any(k.startswith("migration.") for k in before)  # no migration running
        # the guest keeps running: its QEMU burns CPU time
        wait_heartbeat(c, "v1", after=wait_heartbeat(c, "v1"))
        later = c.domstats(["v1"], ["cpu-total"])["v1"]
        assert set(later) == {"cpu.time", "cpu.user", "cpu.system"}
        assert later["cpu.time"] > before["cpu.time"]
        # every domain by default; unknown groups and domains are refused
        assert "v1" in c.domstats()
        with pytest.raises(VmferryError) as err:
            c.domstats(["v1"], ["bogus"])
        assert err.value.code == ErrorCode.INVALID_ARG
        with pytest.raises(VmferryError) as err:
            c.domstats(["nosuch"])
        assert err.value.code == ErrorCode.NO_DOMAIN


def _kib(tag: str, kib: int) -> str:
    return f'<{tag} unit="KiB">{kib}</{tag}>'


def test_setmem_and_setmaxmem(host: DiskHost) -> None:
    with host.client() as c:
        first = wait_heartbeat(c, "v1")
        info = c.set_memory("v1", 128 * MIB)  # --current on a running domain: live
        assert (info.memory_kib, info.max_memory_kib) == (128 * MIB, MEMORY_MIB * MIB)
        stats = c.domstats(["v1"], ["balloon"])["v1"]
        assert stats["balloon.target"] == 128 * MIB
        assert _kib("currentMemory", 128 * MIB) in c.dumpxml("v1")
        # the persistent definition is untouched without --config
        assert _kib("currentMemory", 128 * MIB) not in c.dumpxml("v1", inactive=True)
        with pytest.raises(VmferryError) as err:
            c.set_memory("v1", 2 * MEMORY_MIB * MIB)
        assert err.value.code == ErrorCode.INVALID_ARG and "maximum" in err.value.message
        # setmaxmem: never live on QEMU; --config changes the definition only
        with pytest.raises(VmferryError) as err:
            c.set_max_memory("v1", 256 * MIB)
        assert err.value.code == ErrorCode.OPERATION_INVALID
        c.set_max_memory("v1", 192 * MIB, config=True)
        c.set_memory("v1", 144 * MIB, config=True)
        inactive = c.dumpxml("v1", inactive=True)
        assert _kib("memory", 192 * MIB) in inactive
        assert _kib("currentMemory", 144 * MIB) in inactive
        assert c.dominfo("v1").max_memory_kib == MEMORY_MIB * MIB  # live: unchanged
        # the guest (no balloon driver) ran on unharmed
        check_continuity(first, wait_heartbeat(c, "v1", after=first))
        # back as it was, for the other tests
        c.set_max_memory("v1", MEMORY_MIB * MIB, config=True)
        c.set_memory("v1", MEMORY_MIB * MIB, config=True)
        c.set_memory("v1", MEMORY_MIB * MIB, live=True)


def test_setmem_needs_a_balloon_and_currentmemory_starts_ballooned(host: DiskHost) -> None:
    with host.client() as c:
        c.create(guest_xml("nb"))  # memballoon none
        with pytest.raises(VmferryError) as err:
            c.set_memory("nb", 64 * MIB)
        assert err.value.code == ErrorCode.OPERATION_INVALID and "balloon" in err.value.message
        with pytest.raises(VmferryError) as err:
            c.set_autostart("nb")
        assert err.value.code == ErrorCode.OPERATION_INVALID and "transient" in err.value.message
        c.destroy("nb")
        # <currentMemory> below <memory>: the daemon sets the balloon's target at start
        memory = f"<memory unit='MiB'>{MEMORY_MIB}</memory>"
        xml = verbs_xml("cm")
        assert memory in xml
        c.create(xml.replace(memory, f"{memory}<currentMemory unit='MiB'>120</currentMemory>"))
        wait_heartbeat(c, "cm")
        info = c.dominfo("cm")
        assert (info.state, info.memory_kib, info.max_memory_kib) == (
            "running",
            120 * MIB,
            MEMORY_MIB * MIB,
        )
        assert c.domstats(["cm"], ["balloon"])["cm"]["balloon.target"] == 120 * MIB
        c.destroy("cm")


def _wait_new_boot(c: Client, name: str, old_boot: str, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hb = wait_heartbeat(c, name, timeout=timeout)
        if hb.boot != old_boot:
            assert hb.errors == 0
            return hb.boot
        time.sleep(0.2)
    raise AssertionError(f"{name} did not boot again within {timeout} s")


def test_reset_and_reboot(host: DiskHost) -> None:
    with host.client() as c, host.client() as watcher, watcher.events() as events:
        run_id = c.dominfo("v1").id
        boot = wait_heartbeat(c, "v1").boot
        c.reset("v1")
        boot2 = _wait_new_boot(c, "v1", boot)
        info = c.reboot("v1")
        assert info.state == "running"
        _wait_new_boot(c, "v1", boot2)
        # the same QEMU all along (a fake reboot), running again
        info = c.dominfo("v1")
        assert (info.id, info.state, info.reason) == (run_id, "running", "booted")
        # the events: reset; then the guest's power-off, the pause it leaves, the reset (the
        # firmware may reset the machine once more on its own: "reboot guest")
        want = [
            ("reboot", "host"),
            ("shutdown", "guest"),
            ("suspended", "shutting-down"),
            ("reboot", "host"),
        ]
        seen = []
        for event in events:
            if event.domain == "v1" and (event.type, event.reason) != ("reboot", "guest"):
                seen.append((event.type, event.reason))
            if len(seen) == len(want):
                break
        assert seen == want
    # both were audited
    log = host.log.read_text()
    for verb in ("reset", "reboot"):
        assert f"POST /v1/domains/v1/{verb} domain=v1 status=200" in log


def _restart(h: Host, *, new_boot: bool) -> None:
    h.kill(signal.SIGTERM)
    if new_boot:  # what a host reboot does: autostart runs once per boot
        (h.state_dir / "run" / "autostarted").unlink()
    h.start()


def _wait_state(c: Client, name: str, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while c.domstate(name).state != state:
        assert time.monotonic() < deadline, f"{name} is {c.domstate(name).state}, not {state}"
        time.sleep(0.1)


def test_autostart() -> None:
    with hosts(1) as (h,):
        with h.client() as c:
            c.define(guest_xml("auto"))
            c.define(guest_xml("manual"))
            # a definition QEMU refuses at start: logged, the daemon and the others go on
            c.define(
                guest_xml("broken").replace(
                    "<vcpu>1</vcpu>",
                    "<vcpu>1</vcpu><cpu mode='custom'><model>no-such-cpu</model></cpu>",
                )
            )
            assert c.set_autostart("auto").autostart is True
            assert c.set_autostart("broken").autostart is True
            assert c.dominfo("manual").autostart is False
            assert (h.state_dir / "autostart" / "auto").exists()
        _restart(h, new_boot=True)
        with h.client() as c:
            _wait_state(c, "auto", "running")
            wait_heartbeat(c, "auto")
            assert c.domstate("manual").state == "shutoff"
            assert c.domstate("broken").state == "shutoff"
            # Autostart runs in the background and one domain after the other: it may still
            # be trying "broken" after "auto" runs.
            deadline = time.monotonic() + 60
            while "autostart: cannot start domain broken" not in h.log.read_text():
                assert time.monotonic() < deadline, h.log_tail()
                time.sleep(0.1)
            c.destroy("auto")
        # a daemon restart in the same host boot does not autostart again
        _restart(h, new_boot=False)
        with h.client() as c:
            assert c.domstate("auto").state == "shutoff"
            assert c.dominfo("auto").autostart is True
            assert c.set_autostart("auto", False).autostart is False
            assert not (h.state_dir / "autostart" / "auto").exists()
            # undefine drops the flag with the definition
            c.set_autostart("broken", True)
            c.undefine("broken")
            assert not (h.state_dir / "autostart" / "broken").exists()


def test_autostart_skips_a_domain_that_migrated_away(fresh_pair: tuple[Host, Host]) -> None:
    a, b = fresh_pair
    with a.client() as c:
        c.define(guest_xml("mig"))
        c.set_autostart("mig")
        c.start("mig")
        before = wait_heartbeat(c, "mig")

    async def hop() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            await migrate(s, d, "mig", MigrateFlags.LIVE)

    asyncio.run(hop())
    with b.client() as d:
        check_continuity(before, wait_heartbeat(d, "mig", after=before))
        assert d.dominfo("mig").autostart is False  # the flag stays with the source
    _restart(a, new_boot=True)
    with a.client() as c:
        info = c.dominfo("mig")
        assert (info.state, info.autostart) == ("shutoff", True)
        assert "left this host by migration" in a.log.read_text()
    with b.client() as d:
        assert d.domstate("mig").state == "running"
    assert os.path.exists(a.state_dir / "autostart" / "mig")


def test_during_a_migration_changes_wait_and_queries_pass(pair: tuple[Host, Host]) -> None:
    """setmem is refused with the lock error while the guest migrates; domstats shows the
    migration; the balloon target set before moves with the guest."""
    a, b = pair
    with a.client() as c:
        c.create(verbs_xml("mv"))
        before = wait_heartbeat(c, "mv")
        c.set_memory("mv", 128 * MIB)

    async def run() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            hop = asyncio.create_task(
                migrate(s, d, "mv", MigrateFlags.LIVE, MigrationParams(bandwidth_mib_s=1))
            )
            deadline = time.monotonic() + 60
            stats: dict[str, object] = {}
            while stats.get("migration.status") != "active":  # the job starts at Begin
                assert time.monotonic() < deadline and not hop.done(), stats
                await asyncio.sleep(0.1)
                stats = (await s.domstats(["mv"], ["migration"]))["mv"]
            assert isinstance(stats["migration.data_total"], int) and stats["migration.data_total"]
            with pytest.raises(VmferryError) as err:
                await s.set_memory("mv", 96 * MIB)
            assert err.value.code == ErrorCode.OPERATION_TIMEOUT
            assert "cannot acquire state change lock" in err.value.message
            await s.set_speed("mv", 0)  # let it finish
            await hop

    asyncio.run(run())
    with b.client() as d:
        check_continuity(before, wait_heartbeat(d, "mv", after=before))
        stats = d.domstats(["mv"], ["balloon"])["mv"]
        assert (stats["balloon.target"], stats["balloon.maximum"]) == (128 * MIB, MEMORY_MIB * MIB)
        d.destroy("mv")
