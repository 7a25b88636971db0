"""Storage migration end to end: two daemons with their own pools, real QEMU, a disk-writing guest.

Each daemon has its own pool ``vm`` (``<root>/hN/pool``): ``<disk type='volume'>``
resolves on each host in its own directory, nothing is shared, the disks move
with the guest over NBD. The test guest stamps, re-stamps and verifies its disk
while the mirror runs; after every hop its memory and disk counters are checked
(:func:`check_continuity`). The last hop of each test leaves the guest paused
on the destination (``--suspend``): then the destination's volume must equal
the source's final content (``qemu-img compare``) and pass the offline verifier,
and the guest resumes and goes on verifying.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate, migrate_p2p
from vmferry.errors import VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.testguest import GuestDisk, Heartbeat, check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.disk import (
    create_image,
    make_image_dir,
    qemu_img_compare,
    verify_disk_image,
    wait_disk_ready,
)

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE
ALL = LIVE | MigrateFlags.NON_SHARED_DISK
INC = LIVE | MigrateFlags.NON_SHARED_INC
PAUSED = MigrateFlags.PAUSED
MIB = 1 << 20
POOL = "vm"
SMALL = "small"  # a tmpfs on the second host: the destination pool that fills up
SIZE = 16 * MIB
BLOCKS = 2048  # the guest's 8 MiB of the 16 MiB disk


def pool_dir(host: Host, pool: str = POOL) -> Path:
    return host.root / pool


class PoolHost(Host):
    """A daemon with its own pools ``vm`` and ``small``."""

    def config_text(self) -> str:
        return super().config_text() + "".join(
            f'[pools.{p}]\npath = "{pool_dir(self, p)}"\n' for p in (POOL, SMALL)
        )


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """Shared storage: a directory both hosts reach."""
    d = make_image_dir()
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(scope="module")
def pair(shared: Path) -> Iterator[tuple[Host, Host]]:
    with hosts(2, host_type=PoolHost, image_roots=[shared]) as (a, b):
        small = pool_dir(b, SMALL)
        small.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vftmp", str(small)], check=True)
        try:
            yield a, b
        finally:
            subprocess.run(["umount", "-l", str(small)], check=False)


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _migrate(
    src: Host, dst: Host, name: str, flags: MigrateFlags, **params: object
) -> MigrationReport:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        return await migrate(s, d, name, flags, MigrationParams(**params))  # type: ignore[arg-type]


async def _p2p(src: Host, dst: Host, name: str, flags: MigrateFlags) -> MigrationReport:
    async with AsyncClient(src.uri) as s:
        return await migrate_p2p(s, dst.uri, name, flags, MigrationParams())


def volume(host: Host, name: str, pool: str = POOL) -> Path:
    return pool_dir(host, pool) / name


def boot(host: Host, name: str, disk: GuestDisk, extra_disks: str = "") -> Heartbeat:
    xml = guest_xml(name, stamp_mib=8, dirty_mib_s=1, hb_ms=250, disk=disk)
    xml = xml.replace("</devices>", extra_disks + "</devices>", 1)
    with host.client() as c:
        c.create(xml)
        return wait_disk_ready(c, name)


def writing_disk(vol: str, fmt: str, pool: str = POOL) -> GuestDisk:
    # host-stamped: the guest verifies from the start and re-stamps 2 MiB/s during the mirror
    return GuestDisk(
        pool=pool, volume=vol, format=fmt, blocks=BLOCKS, mib_s=2, verify_mib_s=8, host_init=True
    )


def _on(host: Host, other: Host, name: str, before: Heartbeat, state: str = "running") -> None:
    """The guest is on *host* only, in *state*; running: memory and disk still verify."""
    with host.client() as c, other.client() as o:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == (state, "none"), info
        assert name not in [d.name for d in o.list_domains(all=True)]
        if state == "running":
            after = wait_heartbeat(c, name, after=before)
            check_continuity(before, after)
            assert after.disk is not None and after.disk.verified > 0


def _resume_and_check(host: Host, name: str, before: Heartbeat) -> None:
    with host.client() as c:
        c.resume(name)
        after = wait_heartbeat(c, name, after=before)
        check_continuity(before, after)
        assert after.disk is not None and after.disk.errors == 0 and after.disk.ioerrors == 0
        c.destroy(name)


def _copied(src: Path, dst: Path, *, blocks: int = BLOCKS) -> None:
    """*dst* holds exactly *src*'s final content, every block a good stamp."""
    same = qemu_img_compare(src, dst)
    assert same.identical, same.output
    verify_disk_image(dst, blocks=blocks).check()


def _heartbeat(host: Host, name: str) -> Heartbeat:
    with host.client() as c:
        return wait_heartbeat(c, name)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copy_storage_all_v3_there_p2p_back(pair: tuple[Host, Host], fmt: str) -> None:
    a, b = pair
    name, vol = f"st-{fmt}", f"st-{fmt}.{fmt}"
    create_image(volume(a, vol), SIZE, fmt=fmt, stamp_blocks=BLOCKS)
    hb = boot(a, name, writing_disk(vol, fmt))
    report = _run(_migrate(a, b, name, ALL))
    assert report.stats["disk_total"] >= SIZE, report.stats  # type: ignore[operator]
    _on(b, a, name, hb)
    assert volume(b, vol).exists()  # created by Prepare: same name, format and size
    # back, peer-to-peer, into the volume still on a (there already: used, never deleted)
    hb = _heartbeat(b, name)
    _run(_p2p(b, a, name, ALL | PAUSED))
    _on(a, b, name, hb, state="paused")
    _copied(volume(b, vol), volume(a, vol))
    _resume_and_check(a, name, hb)
    for host in (a, b):
        volume(host, vol).unlink()


def test_copy_storage_inc_over_shared_backing(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name, top = "st-inc", "inc.qcow2"
    for host in (a, b):  # the same base volume in both pools; only the overlay moves
        create_image(volume(host, "base.raw"), SIZE, stamp_blocks=BLOCKS)
    with a.client() as c:
        c.vol_create(POOL, top, SIZE, "qcow2", "base.raw", "raw")
    hb = boot(a, name, writing_disk(top, "qcow2"))
    report = _run(_migrate(a, b, name, INC | PAUSED))
    _on(b, a, name, hb, state="paused")
    assert report.stats["disk_total"] > 0, report.stats  # type: ignore[operator]
    with b.client() as c:
        info = c.vol_info(POOL, top)
        assert [(x.name, x.format) for x in info.backing] == [("base.raw", "raw")], info
    # only the top layer travelled: what the guest re-stamped of its first 8 MiB, never the
    # 16 MiB base (a full copy would allocate all of it in the overlay)
    assert info.allocation < 12 * MIB, info
    _copied(volume(a, top), volume(b, top))
    _resume_and_check(b, name, hb)
    for host in (a, b):
        for vol in (top, "base.raw"):
            volume(host, vol).unlink(missing_ok=True)


def test_migrate_disks_subset(pair: tuple[Host, Host], shared: Path) -> None:
    a, b = pair
    name, vol = "st-subset", "sub.qcow2"
    create_image(volume(a, vol), SIZE, fmt="qcow2", stamp_blocks=BLOCKS)
    vdb = create_image(shared / "sub-shared.qcow2", 8 * MIB, fmt="qcow2")  # on both hosts
    vdc = create_image(shared / "sub-ro.raw", MIB)  # read-only: never copied
    extra = (
        f"<disk type='file'><driver name='qemu' type='qcow2'/><source file='{vdb}'/>"
        "<target dev='vdb' bus='virtio'/></disk>"
        f"<disk type='file'><driver name='qemu' type='raw'/><source file='{vdc}'/>"
        "<target dev='vdc' bus='virtio'/><readonly/></disk>"
    )
    hb = boot(a, name, writing_disk(vol, "qcow2"), extra)
    with pytest.raises(VmferryError, match="has no disk 'vdd'"):
        _run(_migrate(a, b, name, ALL, migrate_disks="vdd"))
    with pytest.raises(VmferryError, match="'vdc' cannot be copied"):
        _run(_migrate(a, b, name, ALL, migrate_disks="vda,vdc"))

    async def v2() -> None:
        async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
            await migrate(s, d, name, ALL, MigrationParams(), version=2)

    with pytest.raises(VmferryError, match="requires migration protocol v3"):
        _run(v2())
    report = _run(_migrate(a, b, name, ALL | PAUSED, migrate_disks="vda"))
    assert report.stats["disk_total"] >= SIZE  # type: ignore[operator]
    # vda only: the destination served no other disk over NBD
    served = b.log.read_text(errors="replace")
    assert "drive-vda" in served and "drive-vdb" not in served and "drive-vdc" not in served
    _on(b, a, name, hb, state="paused")
    _copied(volume(a, vol), volume(b, vol))
    _resume_and_check(b, name, hb)
    for host in (a, b):
        volume(host, vol).unlink()
    vdb.unlink()
    vdc.unlink()


def test_abort_mid_mirror_deletes_only_what_it_created(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name = "st-abort"
    create_image(volume(a, "abort.raw"), 64 * MIB, stamp_blocks=BLOCKS)
    create_image(volume(a, "keep.raw"), 4 * MIB)
    existing = create_image(volume(b, "keep.raw"), 4 * MIB)  # there before: never deleted
    extra = (
        f"<disk type='volume'><driver name='qemu' type='raw'/>"
        f"<source pool='{POOL}' volume='keep.raw'/><target dev='vdb' bus='virtio'/></disk>"
    )
    hb = boot(a, name, writing_disk("abort.raw", "raw"), extra)

    async def go() -> None:
        # 1 MiB/s (the migration's bandwidth applies to the mirrors): 64 MiB take a minute
        task = asyncio.create_task(_migrate(a, b, name, ALL, bandwidth_mib_s=1))
        async with AsyncClient(a.uri) as s:
            processed = 0
            while not processed and not task.done():
                await asyncio.sleep(0.2)
                info = await s.jobinfo(name)
                processed = int(info.stats.get("disk_processed", 0))
            assert int(info.stats.get("disk_total", 0)) >= 64 * MIB, info
            assert volume(b, "abort.raw").exists()  # created there by Prepare
            await s.jobabort(name)
        with pytest.raises(VmferryError, match="canceled by client"):
            await task

    _run(go())
    _on(a, b, name, hb)
    with a.client() as c:
        assert c.jobinfo(name).type == "none"
    assert not volume(b, "abort.raw").exists()  # created by the migration: deleted
    assert existing.exists()
    with a.client() as c:
        c.destroy(name)
    for path in (volume(a, "abort.raw"), volume(a, "keep.raw"), existing):
        path.unlink()


def test_destination_pool_full(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name = "st-full"
    create_image(volume(a, "full.qcow2", SMALL), SIZE, fmt="qcow2", stamp_blocks=BLOCKS)
    hb = boot(a, name, writing_disk("full.qcow2", "qcow2", SMALL))
    # qcow2 is created sparse in the 4 MiB tmpfs; the mirror runs out of room
    with pytest.raises(VmferryError, match=r"copying disk 'vda'|No space left"):
        _run(_migrate(a, b, name, ALL))
    _on(a, b, name, hb)
    assert list(pool_dir(b, SMALL).iterdir()) == []  # the half-copied volume is gone
    with a.client() as c:
        assert c.jobinfo(name).type == "none"
        c.destroy(name)
    volume(a, "full.qcow2", SMALL).unlink()


# -- a daemon restarted mid-mirror -------------------------------------------------------------

POINT = "src-perform-mirror-ready"  # every mirror in sync, the memory not yet moving


@contextlib.contextmanager
def paused_pair(shared: Path) -> Iterator[tuple[Host, Host, Path]]:
    where = make_image_dir(prefix="vffp")
    env = {"VMFERRY_FAILPOINTS": f"{POINT}=pause", "VMFERRY_FAILPOINTS_DIR": str(where)}
    with hosts(2, host_type=PoolHost, envs=[env, {}], image_roots=[shared]) as (a, b):
        yield a, b, where
    subprocess.run(["rm", "-rf", str(where)], check=False)


async def _until_hit(where: Path, task: asyncio.Task[MigrationReport]) -> None:
    while not (where / f"{POINT}.hit").exists():  # another process makes it
        assert not task.done(), task
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("restarted", ["source", "destination"])
def test_daemon_restarted_mid_mirror(shared: Path, restarted: str) -> None:
    with paused_pair(shared) as (a, b, where):
        name, vol = f"st-rs-{restarted}", "rs.qcow2"
        create_image(volume(a, vol), SIZE, fmt="qcow2", stamp_blocks=BLOCKS)
        hb = boot(a, name, writing_disk(vol, "qcow2"))

        async def go() -> None:
            task = asyncio.create_task(_migrate(a, b, name, ALL))
            await _until_hit(where, task)
            assert volume(b, vol).exists()
            victim = a if restarted == "source" else b
            await asyncio.to_thread(victim.kill)
            victim.extra_env = {}  # restarted without the failpoint
            await asyncio.to_thread(victim.start)
            (where / f"{POINT}.release").touch()  # the source, if it lived, goes on
            with pytest.raises(VmferryError):
                await task

        _run(go())
        # recovery: the source's mirrors cancelled, the guest runs on there from its own disk
        _on(a, b, name, hb)
        with a.client() as c:
            assert c.jobinfo(name).type == "none"
        assert not volume(b, vol).exists()  # created by the migration: deleted
        hb = _heartbeat(a, name)
        # and the guest can still go: the leftovers of the first try are gone on both sides
        report = _run(_migrate(a, b, name, ALL | PAUSED))
        assert report.stats["disk_total"] >= SIZE  # type: ignore[operator]
        _on(b, a, name, hb, state="paused")
        _copied(volume(a, vol), volume(b, vol))
        _resume_and_check(b, name, hb)


# -- Finish fails after the switchover -----------------------------------------------------------


def test_finish_failing_after_the_switchover_leaves_the_source_clean(shared: Path) -> None:
    """The mirrors concluded at the switchover stay until the source runs on: then they go.

    The destination's Finish fails (failpoint) once every block and the memory are there;
    the cancelled Confirm resumes the source on its own disk, with no mirror job and no NBD
    client node left, so the guest migrates again.
    """
    env = {"VMFERRY_FAILPOINTS": "dst-finish-storage=error"}
    with hosts(2, host_type=PoolHost, envs=[{}, env], image_roots=[shared]) as (a, b):
        name, vol = "st-finish", "fin.qcow2"
        create_image(volume(a, vol), SIZE, fmt="qcow2", stamp_blocks=BLOCKS)
        hb = boot(a, name, writing_disk(vol, "qcow2"))
        with pytest.raises(VmferryError, match="dst-finish-storage"):
            _run(_migrate(a, b, name, ALL))
        _on(a, b, name, hb)
        with a.client() as c:
            assert c.jobinfo(name).type == "none"
        assert not volume(b, vol).exists()  # created by the migration: deleted
        hb = _heartbeat(a, name)
        b.kill()
        b.extra_env = {}  # without the failpoint: the same migration goes through
        b.start()
        # Its mirror job and NBD client node have the first try's names: QEMU refuses
        # both (job id in use, duplicate node) unless the first try's are gone.
        _run(_migrate(a, b, name, ALL | PAUSED))
        _on(b, a, name, hb, state="paused")
        _copied(volume(a, vol), volume(b, vol))
        _resume_and_check(b, name, hb)
