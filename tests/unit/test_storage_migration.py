"""Storage migration logic without QEMU: flags, parameters, disk selection, the cookie's
``<nbd>``, block job events and the mirror commands (a fake monitor)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from vmferry.domain.xml import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.jobs import DomainJob
from vmferry.migration import params as mparams
from vmferry.migration import storage
from vmferry.migration.cookie import MigrationCookie, NbdDisk, parse_cookie
from vmferry.migration.flags import KNOWN_FLAGS, MigrateFlags, parse_flags
from vmferry.migration.params import MigrationParams
from vmferry.migration.restart import bookkeeping, restore_bookkeeping
from vmferry.qemu import blockjob
from vmferry.qemu.confine import Confinement
from vmferry.qemu.domain import QemuDomain
from vmferry.testing.fakemonitor import FakeMonitor

ALL = MigrateFlags.LIVE | MigrateFlags.NON_SHARED_DISK
INC = MigrateFlags.LIVE | MigrateFlags.NON_SHARED_INC
UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
HOST_A = "11111111-1111-1111-1111-111111111111"
HOST_B = "22222222-2222-2222-2222-222222222222"

_XML = f"""<domain type='qemu'><name>st</name><uuid>{UUID}</uuid><memory unit='MiB'>128</memory>
<os><type>hvm</type></os><devices>
<disk type='volume'><driver name='qemu' type='qcow2'/><source pool='vm' volume='a.qcow2'/>
<target dev='vda' bus='virtio'/></disk>
<disk type='file'><driver name='qemu' type='raw'/><source file='/images/b.raw'/>
<target dev='vdb' bus='virtio'/></disk>
<disk type='file'><driver name='qemu' type='raw'/><source file='/images/ro.raw'/>
<target dev='vdc' bus='virtio'/><readonly/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/images/x.iso'/>
<target dev='hdc' bus='ide'/><readonly/></disk>
</devices></domain>"""


def _domain(mon: FakeMonitor | None = None) -> QemuDomain:
    dom = QemuDomain(definition=parse_domain_xml(_XML), persistent=None, job=DomainJob("st"))
    if mon is not None:
        dom.monitor = mon.as_monitor()
        mon.add_event_handler(
            lambda name, data, ts: (blockjob.on_event(dom, name, data), dom.notify())
        )
    return dom


# -- flags and parameters --------------------------------------------------------------------


def test_flags_have_libvirts_values() -> None:
    assert MigrateFlags.NON_SHARED_DISK == 1 << 6
    assert MigrateFlags.NON_SHARED_INC == 1 << 7
    assert MigrateFlags.NON_SHARED_SYNCHRONOUS_WRITES == 1 << 18
    assert MigrateFlags.POSTCOPY_RESUME == 1 << 19
    assert parse_flags(int(ALL)) == ALL
    with pytest.raises(VmferryError, match="unsupported migration flags"):
        parse_flags(KNOWN_FLAGS + 1 << 30)


@pytest.mark.parametrize(
    ("flags", "params", "message"),
    [
        (ALL | MigrateFlags.NON_SHARED_INC, {}, "mutually exclusive"),
        (MigrateFlags.LIVE, {"migrate_disks": "vda"}, "require --copy-storage"),
        (MigrateFlags.LIVE | MigrateFlags.NON_SHARED_SYNCHRONOUS_WRITES, {}, "require"),
        (
            MigrateFlags.OFFLINE | MigrateFlags.PERSIST_DEST | MigrateFlags.NON_SHARED_DISK,
            {},
            "offline migration cannot copy",
        ),
        (ALL | MigrateFlags.POSTCOPY, {}, "post-copy migration cannot copy"),
    ],
)
def test_storage_options_that_do_not_go_together(
    flags: MigrateFlags, params: dict[str, str], message: str
) -> None:
    with pytest.raises(VmferryError, match=message):
        MigrationParams.from_dict(params).validate(flags)


@pytest.mark.parametrize(
    "value", ["vda,", "vda,vda", "../x", "vda;rm", "VDA", "xvda", ",", "a" * 500]
)
def test_migrate_disks_must_be_distinct_targets(value: str) -> None:
    with pytest.raises(VmferryError) as err:
        MigrationParams.from_dict({"migrate_disks": value})
    assert err.value.code == ErrorCode.INVALID_ARG


def test_migrate_disks_accepted() -> None:
    params = MigrationParams.from_dict({"migrate_disks": "vda,sdb,hdc"})
    params.validate(ALL | MigrateFlags.NON_SHARED_SYNCHRONOUS_WRITES)
    assert params.disk_targets() == ["vda", "sdb", "hdc"]


def test_pause_before_switchover_only_when_copying_storage() -> None:
    assert mparams.capabilities(ALL, source=True)["pause-before-switchover"] is True
    # set off explicitly: a failed storage migration must not leave it on for the next one
    assert mparams.capabilities(MigrateFlags.LIVE, source=True)["pause-before-switchover"] is False
    assert "pause-before-switchover" not in mparams.capabilities(ALL, source=False)


# -- disk selection --------------------------------------------------------------------------


def test_default_selection_is_every_writable_disk_with_a_source() -> None:
    d = parse_domain_xml(_XML)
    assert [x.target_dev for x in storage.select_disks(d, MigrationParams())] == ["vda", "vdb"]


def test_selection_by_name() -> None:
    d = parse_domain_xml(_XML)
    chosen = storage.select_disks(d, MigrationParams(migrate_disks="vdb"))
    assert [x.target_dev for x in chosen] == ["vdb"]
    with pytest.raises(VmferryError, match="has no disk 'vdz'"):
        storage.select_disks(d, MigrationParams(migrate_disks="vdz"))
    for readonly in ("vdc", "hdc"):
        with pytest.raises(VmferryError, match=f"'{readonly}' cannot be copied"):
            storage.select_disks(d, MigrationParams(migrate_disks=readonly))


def test_begin_reads_capacity_and_backing_from_qemu() -> None:
    mon = FakeMonitor(
        replies={
            "query-named-block-nodes": [
                {
                    "node-name": "fmt-vda",
                    "image": {
                        "virtual-size": 1 << 30,
                        "backing-filename": "/some/pool/base.raw",
                        "backing-image": {"format": "raw"},
                    },
                },
                {"node-name": "fmt-vdb", "image": {"virtual-size": 4096}},
            ]
        }
    )
    dom = _domain(mon)
    disks = asyncio.run(storage.begin_disks(dom, MigrationParams(), top_only=True))
    assert disks == [NbdDisk("vda", 1 << 30, "base.raw", "raw"), NbdDisk("vdb", 4096)]
    full = asyncio.run(storage.begin_disks(dom, MigrationParams(), top_only=False))
    assert [d.backing for d in full] == ["", ""]  # the whole chain goes: no backing file


# -- the cookie ------------------------------------------------------------------------------


def test_nbd_cookie_round_trip_and_libvirts_form() -> None:
    cookie = MigrationCookie(name="st", uuid=UUID, hostname="a", hostuuid=HOST_A)
    cookie.nbd_port = 49153
    cookie.nbd_disks = [NbdDisk("vda", 1 << 30, "base.raw", "raw"), NbdDisk("vdb", 4096)]
    text = cookie.to_xml()
    assert '<nbd port="49153"><disk target="vda" capacity="1073741824"' in text
    back = parse_cookie(text, name="st", uuid=UUID, local_hostuuid=HOST_B)
    assert back.nbd_port == 49153 and back.nbd_disks == cookie.nbd_disks


@pytest.mark.parametrize("backing", ["../etc/passwd", "/abs/path", ".hidden", "a/b"])
def test_cookie_backing_must_be_a_plain_name(backing: str) -> None:
    text = (
        f"<qemu-migration><name>st</name><uuid>{UUID}</uuid><hostname>a</hostname>"
        f"<hostuuid>{HOST_A}</hostuuid><nbd><disk target='vda' capacity='1' "
        f"backing='{backing}' backingFormat='raw'/></nbd></qemu-migration>"
    )
    with pytest.raises(VmferryError, match="Malformed backing file"):
        parse_cookie(text, name="st", uuid=UUID, local_hostuuid=HOST_B)


def test_storage_bookkeeping_survives_a_restart() -> None:
    dom = _domain()
    dom.migration.storage_disks = ["vda"]
    dom.migration.created_volumes = ["/pool/a.qcow2"]
    dom.migration.nbd_port = 49000
    saved = json.loads(json.dumps(bookkeeping(dom)))
    back = _domain()
    restore_bookkeeping(back, saved)
    assert back.migration.storage_disks == ["vda"]
    assert back.migration.created_volumes == ["/pool/a.qcow2"]
    assert back.migration.nbd_port == 0  # the dead daemon's port, never reserved here
    restore_bookkeeping(back, {"created_volumes": [1, 2]})
    assert back.migration.created_volumes == []


# -- block jobs --------------------------------------------------------------------------------


def test_mirror_commands_and_ready_wait() -> None:
    mon = FakeMonitor()
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda", "vdb"]
    dom.migration.flags = int(INC | MigrateFlags.NON_SHARED_SYNCHRONOUS_WRITES)

    async def go() -> None:
        both = asyncio.Event()

        def mirror(args: dict[str, object]) -> dict[str, object]:
            if args["job-id"] == "migrate-vda":  # in sync at once
                mon.emit("BLOCK_JOB_READY", {"device": "migrate-vda", "len": 10, "offset": 10})
            else:
                both.set()
            return {}

        mon.always("blockdev-mirror", mirror)
        waiting = asyncio.create_task(storage.mirror_all(dom, "192.0.2.7", 49153))
        await both.wait()
        await asyncio.sleep(0.01)
        assert not waiting.done()  # vdb is not in sync yet
        mon.emit("BLOCK_JOB_READY", {"device": "migrate-vdb", "len": 5, "offset": 5})
        await asyncio.wait_for(waiting, 5)

    asyncio.run(go())
    add = mon.args_of("blockdev-add")[0]
    assert add["server"] == {"type": "inet", "host": "192.0.2.7", "port": "49153"}
    assert add["export"] == "drive-vda" and add["node-name"] == "migrate-vda"
    mirror = mon.args_of("blockdev-mirror")[0]
    assert mirror["device"] == "fmt-vda" and mirror["target"] == "migrate-vda"
    assert mirror["sync"] == "top" and mirror["copy-mode"] == "write-blocking"
    final = storage.final_progress(dom)
    sync_ms = final.pop("disk_sync_ms")
    assert final == {"disk_total": 15, "disk_processed": 15, "disk_remaining": 0}
    # from vda's start to vdb's READY, which came after the 10 ms sleep above
    assert sync_ms >= 10


def test_a_failing_mirror_fails_the_wait() -> None:
    mon = FakeMonitor()
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda"]
    dom.migration.flags = int(ALL)

    def mirror(args: dict[str, object]) -> dict[str, object]:
        mon.emit("BLOCK_JOB_COMPLETED", {"device": "migrate-vda", "error": "No space left"})
        mon.emit("JOB_STATUS_CHANGE", {"id": "migrate-vda", "status": "concluded"})
        return {}

    mon.always("blockdev-mirror", mirror)

    async def go() -> None:
        with pytest.raises(VmferryError, match=r"copying disk 'vda' .* failed: No space left"):
            await asyncio.wait_for(storage.mirror_all(dom, "192.0.2.7", 49153), 5)

    asyncio.run(go())
    assert mon.args_of("blockdev-mirror")[0]["sync"] == "full"


def test_switchover_drains_without_pivot_and_failure_forces() -> None:
    mon = FakeMonitor()
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda"]
    dom.block_jobs["migrate-vda"] = blockjob.BlockJob(status="ready")

    def cancelled(args: dict[str, object]) -> dict[str, object]:
        mon.emit("JOB_STATUS_CHANGE", {"id": "migrate-vda", "status": "concluded"})
        return {}

    mon.always("block-job-cancel", cancelled)
    asyncio.run(storage.complete(dom))
    assert mon.args_of("block-job-cancel") == [{"device": "migrate-vda", "force": False}]
    assert mon.args_of("job-dismiss") == []  # not in the downtime, nor before Finish
    # the guest stays here after all (a cancelled Confirm): the concluded job goes first
    mon.reply("query-jobs", [{"id": "migrate-vda", "status": "concluded"}])
    mon.reply("query-named-block-nodes", [])  # gone with the dismissed job
    asyncio.run(storage.cancel(dom))
    assert mon.args_of("job-dismiss") == [{"id": "migrate-vda"}]
    assert mon.args_of("blockdev-del") == [{"node-name": "migrate-vda"}]
    assert mon.args_of("block-job-cancel") == [{"device": "migrate-vda", "force": False}]

    # a restart's cleanup asks QEMU, not its own memory; other jobs are not touched
    mon2 = FakeMonitor(
        replies={
            "query-jobs": [
                {"id": "migrate-vdb", "status": "running"},
                {"id": "backup0", "status": "running"},
            ],
            "query-named-block-nodes": [{"node-name": "migrate-vdb"}, {"node-name": "fmt-vda"}],
        }
    )
    dom2 = _domain(mon2)

    def forced(args: dict[str, object]) -> dict[str, object]:
        mon2.emit("JOB_STATUS_CHANGE", {"id": "migrate-vdb", "status": "concluded"})
        return {}

    mon2.always("block-job-cancel", forced)
    asyncio.run(blockjob.cancel_mirrors(dom2))
    assert mon2.args_of("block-job-cancel") == [{"device": "migrate-vdb", "force": True}]
    assert {"node-name": "migrate-vdb"} in mon2.args_of("blockdev-del")
    assert {"node-name": "fmt-vda"} not in mon2.args_of("blockdev-del")
    assert dom2.block_jobs == {}


def test_unrelated_job_events_are_ignored() -> None:
    dom = _domain()
    blockjob.on_event(dom, "JOB_STATUS_CHANGE", {"id": "backup0", "status": "running"})
    assert dom.block_jobs == {}


def test_disk_figures_add_to_data() -> None:
    stats = storage.with_disk(
        {"data_total": 100, "data_processed": 40, "data_remaining": 60},
        {"disk_total": 10, "disk_processed": 5, "disk_remaining": 5},
    )
    assert (stats["data_total"], stats["data_processed"], stats["data_remaining"]) == (110, 45, 65)
    assert storage.with_disk({"status": "setup"}, {}) == {"status": "setup"}


# -- creating disks on the destination -------------------------------------------------------


def test_file_disks_are_created_only_below_a_root(tmp_path: Path) -> None:
    from vmferry.daemon import migrate_disks

    root = tmp_path / "images"
    root.mkdir()
    confine = Confinement(roots=[root], state_root=tmp_path / "state")
    disk = parse_domain_xml(_XML).devices.disks[1]
    outside = tmp_path / "elsewhere.raw"
    with pytest.raises(VmferryError) as err:
        asyncio.run(migrate_disks.create_disk(confine, str(outside), disk, 1 << 20))
    assert err.value.code == ErrorCode.ACCESS_DENIED and not outside.exists()
    sneaky = root / ".." / "sneaky.raw"
    with pytest.raises(VmferryError):
        asyncio.run(migrate_disks.create_disk(confine, str(sneaky), disk, 1 << 20))
    with pytest.raises(VmferryError, match="without \\[paths\\] roots"):
        asyncio.run(migrate_disks.create_disk(None, str(root / "x.raw"), disk, 1 << 20))
    target = root / "b.raw"
    assert asyncio.run(migrate_disks.create_disk(confine, str(target), disk, 1 << 20))
    assert target.stat().st_size == 1 << 20
    # there already: not created, so never ours to delete
    assert not asyncio.run(migrate_disks.create_disk(confine, str(target), disk, 1 << 20))
    os.unlink(target)


def test_a_stalled_copy_fails_the_wait() -> None:
    # the destination stopped reading without closing the connection: no byte moves
    mon = FakeMonitor(
        replies={"query-block-jobs": [{"device": "migrate-vda", "len": 9, "offset": 3}]}
    )
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda"]
    dom.migration.flags = int(ALL)
    with pytest.raises(VmferryError, match=r"made no progress for 0\.6 s") as err:
        asyncio.run(storage.mirror_all(dom, "192.0.2.7", 49153, stall_s=0.6))
    assert err.value.code == ErrorCode.OPERATION_TIMEOUT
    assert len(mon.args_of("query-block-jobs")) >= 2


# -- Finish: the NBD server stops with the cont ---------------------------------------------------


class _Ports:
    """The part of MigrationHost that release_nbd uses."""

    def __init__(self) -> None:
        self.released: list[int] = []

    def release_port(self, port: int) -> None:
        self.released.append(port)


def test_finish_stops_the_nbd_server_in_the_cont_batch_before_the_cont() -> None:
    mon = FakeMonitor()
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda"]
    dom.migration.nbd_port = 49153
    ports = _Ports()
    stop = storage.release_nbd(ports, dom)  # type: ignore[arg-type]
    assert ports.released == [49153] and dom.migration.nbd_port == 0
    assert mon.commands() == []  # nothing sent yet: it goes with the cont
    asyncio.run(storage.stop_nbd_with(dom, stop, ("cont", None)))
    assert mon.commands() == ["nbd-server-stop", "cont"]


def test_a_failed_nbd_stop_is_logged_and_a_failed_cont_raised() -> None:
    mon = FakeMonitor()
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda"]
    mon.fail("nbd-server-stop", "NBD server not running")
    stop = storage.release_nbd(_Ports(), dom)  # type: ignore[arg-type]
    asyncio.run(storage.stop_nbd_with(dom, stop, ("cont", None)))  # the stop's error: logged
    mon.fail("cont", "guest crashed")
    with pytest.raises(VmferryError, match="guest crashed"):
        asyncio.run(storage.stop_nbd_with(dom, stop, ("cont", None)))
    assert mon.commands() == ["nbd-server-stop", "cont", "nbd-server-stop", "cont"]


def test_without_copied_disks_finish_sends_only_the_cont() -> None:
    mon = FakeMonitor()
    dom = _domain(mon)
    stop = storage.release_nbd(_Ports(), dom)  # type: ignore[arg-type]
    assert stop == []
    asyncio.run(storage.stop_nbd_with(dom, stop))  # paused: nothing at all
    asyncio.run(storage.stop_nbd_with(dom, stop, ("cont", None)))
    assert mon.commands() == ["cont"]


def test_the_switchover_fails_when_the_mirrors_are_gone() -> None:
    """QEMU exited at the switchover (its jobs cleared): no device state may follow."""
    mon = FakeMonitor()
    dom = _domain(mon)
    dom.migration.storage_disks = ["vda"]
    with pytest.raises(VmferryError, match="mirrors of domain 'st' are gone"):
        asyncio.run(storage.complete(dom))
    assert mon.commands() == []
    dom.migration.storage_disks = []
    asyncio.run(storage.complete(dom))  # nothing copied: nothing to drain
