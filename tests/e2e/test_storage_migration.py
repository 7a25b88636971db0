"""Storage migration end to end: two daemons with their own disk directories, real QEMU.

Each host keeps the guest's disks in its own directory (``<root>/hN/disks``,
a configured root), so nothing is shared: the disks move with the guest over
NBD. After every hop the guest's memory is checked; once the guest is stopped
the destination's disk must equal the source's final content (qemu-img
compare) and the source's disk is left as it was.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE
ALL = LIVE | MigrateFlags.NON_SHARED_DISK
INC = LIVE | MigrateFlags.NON_SHARED_INC
MIB = 1 << 20


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def disks(host: Host) -> Path:
    return host.root / "disks"


def shared(host: Host) -> Path:
    """A directory both hosts reach: shared storage."""
    return host.root.parent / "shared"


class DiskHost(Host):
    """A daemon whose own disk directory (and the shared one) are roots."""

    def config_text(self) -> str:
        text = super().config_text()
        return text.replace("roots = [", f'roots = ["{disks(self)}", "{shared(self)}", ', 1)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Host, Host]]:
    with hosts(2, host_type=DiskHost) as made:
        for host in made:
            disks(host).mkdir()
            os.chmod(host.root, 0o755)  # the QEMU user reaches its disks below
            _share_with_qemu(disks(host))
        shared(made[0]).mkdir()
        _share_with_qemu(shared(made[0]))
        os.chmod(made[0].root.parent, 0o755)
        yield made[0], made[1]


def _share_with_qemu(path: Path) -> None:
    subprocess.run(["chown", "vmferry-qemu:", str(path)], check=False)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def make_disk(host: Host, name: str, fmt: str, size: str, *, backing: str = "") -> Path:
    path = disks(host) / name
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", "raw"]
    qemu_img(*args, str(path), size)
    _share_with_qemu(path)
    return path


def disk_xml(target: str, path: Path, fmt: str, *, readonly: bool = False) -> str:
    ro = "<readonly/>" if readonly else ""
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/>{ro}</disk>"
    )


def with_disks(name: str, *disk_elems: str) -> str:
    # a fixed UUID: the destination's XML (each disk in its own directory) must match it
    xml = guest_xml(name, uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name)))
    return xml.replace("<devices>\n", "<devices>\n" + "".join(disk_elems) + "\n", 1)


def _moved(xml: str, src: Host, dst: Host) -> str:
    """The domain XML for *dst*: each disk in *dst*'s own directory."""
    return xml.replace(str(disks(src)), str(disks(dst)))


async def _migrate(
    src: Host, dst: Host, name: str, xml: str, flags: MigrateFlags, **params: object
) -> MigrationReport:
    p = MigrationParams(dest_xml=_moved(xml, src, dst), **params)  # type: ignore[arg-type]
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        return await migrate(s, d, name, flags, p)


async def _p2p(
    src: Host, dst: Host, name: str, xml: str, flags: MigrateFlags, **params: object
) -> MigrationReport:
    p = MigrationParams(dest_xml=_moved(xml, src, dst), **params)  # type: ignore[arg-type]
    async with AsyncClient(src.uri) as s:
        return await migrate_p2p(s, dst.uri, name, flags, p)


def _on(host: Host, other: Host, name: str, before: Heartbeat) -> Heartbeat:
    with host.client() as c, other.client() as o:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == ("running", "none"), info
        assert name not in [d.name for d in o.list_domains(all=True)]
        after = wait_heartbeat(c, name, after=before)
        check_continuity(before, after)
    return after


def _destroy(host: Host, name: str) -> None:
    with host.client() as c:
        if name in [d.name for d in c.list_domains(all=True)]:
            c.destroy(name)


def _same(a: Path, b: Path) -> None:
    out = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _stamp(image: Path, fmt: str) -> None:
    # Data the guest never wrote: it must arrive all the same (and sparse gaps stay zero).
    qemu_io(image, fmt, "write -P 0x5a 0 1M", "write -P 0xa5 7M 512k", "write -P 0x11 15M 1M")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copy_storage_all_there_and_back(pair: tuple[Host, Host], fmt: str) -> None:
    a, b = pair
    name = f"st-{fmt}"
    src_disk = make_disk(a, f"{name}.img", fmt, "16M")
    _stamp(src_disk, fmt)
    xml = with_disks(name, disk_xml("vda", src_disk, fmt))
    with a.client() as c:
        c.create(xml)
        hb = wait_heartbeat(c, name)
    report = _run(_migrate(a, b, name, xml, ALL))
    assert report.stats["disk_total"] >= 16 * MIB, report.stats  # type: ignore[operator]
    hb = _on(b, a, name, hb)
    dst_disk = disks(b) / src_disk.name
    assert qemu_img("info", "-U", str(dst_disk)).count(f"file format: {fmt}") == 1
    # and back, peer-to-peer, into the disk that is still there (not deleted: not created)
    _run(_p2p(b, a, name, _moved(xml, a, b), ALL))
    _on(a, b, name, hb)
    _destroy(a, name)
    _same(src_disk, dst_disk)
    dst_disk.unlink()
    src_disk.unlink()


def test_copy_storage_inc_over_shared_backing(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name = "st-inc"
    # the same base image on both hosts; only the overlay moves
    for host in (a, b):
        base = make_disk(host, "base.raw", "raw", "16M")
        qemu_io(base, "raw", "write -P 0x33 0 16M")
    top = make_disk(a, "inc.qcow2", "qcow2", "16M", backing="base.raw")
    qemu_io(top, "qcow2", "write -P 0x44 4M 1M")
    xml = with_disks(name, disk_xml("vda", top, "qcow2"))
    with a.client() as c:
        c.create(xml)
        hb = wait_heartbeat(c, name)
    report = _run(_migrate(a, b, name, xml, INC))
    _on(b, a, name, hb)
    # only the top layer travelled: far less than the whole 16 MiB disk
    assert report.stats["disk_total"] < 16 * MIB, report.stats  # type: ignore[operator]
    _destroy(b, name)
    dst_top = disks(b) / "inc.qcow2"
    assert "backing file: base.raw" in qemu_img("info", "-U", str(dst_top))
    _same(top, dst_top)
    for path in (top, dst_top, disks(a) / "base.raw", disks(b) / "base.raw"):
        path.unlink()


def test_migrate_disks_subset_and_readonly_stays(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name = "st-subset"
    vda = make_disk(a, "sub-a.qcow2", "qcow2", "8M")
    qemu_io(vda, "qcow2", "write -P 0x77 0 1M")
    vdb = shared(a) / "sub-b.qcow2"  # shared storage: both hosts name the same file
    qemu_img("create", "-q", "-f", "qcow2", str(vdb), "8M")
    _share_with_qemu(vdb)
    iso = shared(a) / "sub-ro.raw"  # read-only: never copied, even without --migrate-disks
    qemu_img("create", "-q", "-f", "raw", str(iso), "1M")
    _share_with_qemu(iso)
    xml = with_disks(
        name,
        disk_xml("vda", vda, "qcow2"),
        disk_xml("vdb", vdb, "qcow2"),
        disk_xml("vdc", iso, "raw", readonly=True),
    )
    with a.client() as c:
        c.create(xml)
        hb = wait_heartbeat(c, name)
    with pytest.raises(VmferryError, match="has no disk 'vdd'"):
        _run(_migrate(a, b, name, xml, ALL, migrate_disks="vdd"))
    with pytest.raises(VmferryError, match="'vdc' cannot be copied"):
        _run(_migrate(a, b, name, xml, ALL, migrate_disks="vda,vdc"))
    hb = _on(a, b, name, hb)
    report = _run(_migrate(a, b, name, xml, ALL, migrate_disks="vda"))
    assert 8 * MIB <= report.stats["disk_total"] < 16 * MIB  # type: ignore[operator]
    _on(b, a, name, hb)
    _destroy(b, name)
    _same(vda, disks(b) / vda.name)
    for path in (vda, vdb, iso, disks(b) / vda.name):
        path.unlink()


def test_abort_mid_mirror_deletes_what_it_created(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name = "st-abort"
    src_disk = make_disk(a, "abort.raw", "raw", "64M")
    qemu_io(src_disk, "raw", "write -P 0x5a 0 64M")
    existing = make_disk(b, "abort-keep.raw", "raw", "8M")
    vdb = make_disk(a, "abort-keep.raw", "raw", "8M")
    xml = with_disks(name, disk_xml("vda", src_disk, "raw"), disk_xml("vdb", vdb, "raw"))
    with a.client() as c:
        c.create(xml)
        hb = wait_heartbeat(c, name)

    async def go() -> None:
        # 1 MiB/s: the mirror of 64 MiB is still running when the abort comes
        task = asyncio.create_task(_migrate(a, b, name, xml, ALL, bandwidth_mib_s=1))
        async with AsyncClient(a.uri) as s:
            processed = 0
            while not processed and not task.done():  # progress: no timing assumption
                await asyncio.sleep(0.2)
                info = await s.jobinfo(name)
                processed = int(info.stats.get("disk_processed", 0))
            assert int(info.stats.get("disk_total", 0)) >= 64 * MIB, info
            assert (disks(b) / src_disk.name).exists()  # created there by Prepare
            await s.jobabort(name)
        with pytest.raises(VmferryError, match="canceled by client"):
            await task

    _run(go())
    hb = _on(a, b, name, hb)
    assert not (disks(b) / src_disk.name).exists()  # created by the migration: deleted
    assert existing.exists()  # was there before: kept
    _destroy(a, name)
    for path in (src_disk, vdb, existing):
        path.unlink()
