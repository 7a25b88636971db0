"""
The test guest writes its disk, through a real vmferryd and QEMU: raw and qcow2 disks are
stamped (by the guest, or by the host before boot), re-stamped and verified with zero
errors, the stopped image passes the offline verifier; and blocks corrupted behind the
guest's back are caught, by the guest while it runs and by the verifier afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.testguest import (
    GuestDisk,
    Heartbeat,
    check_continuity,
    guest_cmdline,
    guest_paths,
    last_heartbeat,
)
from vmferry.testing import Host, hosts, poll_heartbeat, wait_heartbeat
from vmferry.testing.disk import (
    DISK_BLOCK,
    check_no_lost_writes,
    create_image,
    make_image_dir,
    qemu_img_compare,
    verify_disk_image,
    wait_disk_ready,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from floor import BareDisk, BareQemu, bare_storage_hop, disk_argv, guest_argv

pytestmark = pytest.mark.qemu

BLOCKS = 1024  # 4 MiB stamped of an 8 MiB disk
SIZE = 8 << 20


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    d = make_image_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def host(images: Path) -> Iterator[Host]:
    with hosts(1, image_roots=[images]) as (h,):
        yield h


def _until(host: Host, name: str, after: Heartbeat, pred, what: str) -> Heartbeat:  # type: ignore[no-untyped-def]
    """The first heartbeat past *after* for which *pred* holds (30 heartbeats at most)."""
    hb = after
    with host.client() as c:
        for _ in range(60):
            hb = wait_heartbeat(c, name, after=hb)
            if pred(hb):
                return hb
        raise AssertionError(f"{what}: never happened; last heartbeat {hb}")


@pytest.mark.parametrize(
    ("fmt", "host_init", "volume"),
    [("raw", False, False), ("qcow2", True, False), ("qcow2", False, True)],
    ids=["raw-file-guest-stamped", "qcow2-file-host-stamped", "qcow2-volume-guest-stamped"],
)
def test_guest_stamps_and_verifies_its_disk(
    host: Host, images: Path, fmt: str, host_init: bool, volume: bool
) -> None:
    name = f"disk-{fmt}{'-vol' if volume else ''}"
    settings = {"format": fmt, "blocks": BLOCKS, "mib_s": 1.0, "verify_mib_s": 8.0}
    if volume:  # in the daemon's default pool, where the daemon made it
        with host.client() as c:
            img = Path(c.vol_create("default", f"{name}.{fmt}", SIZE, fmt).path)
        disk = GuestDisk(pool="default", volume=f"{name}.{fmt}", **settings)  # type: ignore[arg-type]
    else:
        img = create_image(
            images / f"{name}.{fmt}", SIZE, fmt=fmt, stamp_blocks=BLOCKS if host_init else 0
        )
        disk = GuestDisk(file=str(img), host_init=host_init, **settings)  # type: ignore[arg-type]
    host.boot_guest(name, stamp_mib=8, dirty_mib_s=1, hb_ms=250, disk=disk)
    with host.client() as c:
        ready = wait_disk_ready(c, name)
        console = c.console(name).data
    assert f"VMFERRY-DISK-READY dev=/dev/vda blocks={BLOCKS}" in console
    assert "VMFERRY-DISK-FATAL" not in console
    # Two full read-backs and some re-stamps, all while memory keeps verifying too.
    after = _until(
        host,
        name,
        ready,
        lambda hb: hb.disk.verified >= 2 * BLOCKS and hb.disk.written >= 50,
        "two verification passes",
    )
    check_continuity(ready, after)
    assert after.disk is not None and after.disk.errors == after.disk.ioerrors == 0
    with host.client() as c:
        c.destroy(name)
    report = verify_disk_image(img, blocks=BLOCKS)
    report.check()
    assert report.stamped == BLOCKS
    assert report.max_gen > 1  # the re-stamps reached the image, not just the first stamp
    # The part the guest does not use stays as it was.
    assert verify_disk_image(img).unstamped == SIZE // DISK_BLOCK - BLOCKS
    # qemu_img_compare sees content, not format: a raw conversion equals, a blank differs.
    copy = images / f"{name}.copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(copy)], check=True)
    assert qemu_img_compare(img, copy).identical
    blank = create_image(images / f"{name}.blank.raw", SIZE)
    assert not qemu_img_compare(img, blank).identical


def test_corrupted_blocks_are_caught(host: Host, images: Path) -> None:
    name = "disk-corrupt"
    img = create_image(images / f"{name}.raw", SIZE, stamp_blocks=BLOCKS)
    disk = GuestDisk(file=str(img), blocks=BLOCKS, mib_s=0.25, verify_mib_s=8, host_init=True)
    host.boot_guest(name, stamp_mib=8, dirty_mib_s=1, hb_ms=250, disk=disk)
    with host.client() as c:
        ready = wait_disk_ready(c, name)
    # Behind the guest's back, as a broken mirror would: QEMU reads the file through the
    # host's page cache, so the guest's next O_DIRECT read-back sees these bytes.
    fd = os.open(img, os.O_WRONLY)
    try:
        for i in range(100, 116):
            os.pwrite(fd, os.urandom(DISK_BLOCK), i * DISK_BLOCK)
    finally:
        os.close(fd)
    with host.client() as c:
        hit = wait_heartbeat(c, name, after=ready)
    assert hit.disk is not None
    # A full read-back pass after the damage: every corrupted block was read (and repaired).
    broken = _until(
        host,
        name,
        hit,
        lambda hb: hb.disk.errors > 0 and hb.disk.verified > hit.disk.verified + BLOCKS,
        "the guest noticing corrupted blocks",
    )
    with pytest.raises(AssertionError, match="disk was corrupted"):
        check_continuity(ready, broken)
    with host.client() as c:
        assert "VMFERRY-DISK-ERR block=1" in c.console(name).data
        c.destroy(name)
    # The guest repaired what it found; the verifier must catch what it did not see.
    fd = os.open(img, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 64, 500 * DISK_BLOCK + 1000)
    finally:
        os.close(fd)
    report = verify_disk_image(img, blocks=BLOCKS)
    assert [i for i, _ in report.bad] == [500] and "torn or corrupted" in report.bad[0][1]
    with pytest.raises(AssertionError, match="not what the guest wrote"):
        report.check()


# --- across a storage migration (the bare-QMP floor of bench/storage_bench.py) -----------------


def _console(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _reader(path: Path):  # type: ignore[no-untyped-def]
    async def read() -> str:
        return _console(path)

    return read


async def test_disk_checked_across_a_bare_storage_hop(images: Path) -> None:
    """NBD + blockdev-mirror + migrate, the guest writing throughout: nothing lost or torn."""
    work = images / "bare"
    work.mkdir()
    kernel, initrd = guest_paths()
    src_img, dst_img = work / "src.qcow2", work / "dst.qcow2"
    create_image(src_img, SIZE, fmt="qcow2", stamp_blocks=BLOCKS)
    disk = GuestDisk(
        file=str(src_img), format="qcow2", blocks=BLOCKS, mib_s=1, verify_mib_s=8, host_init=True
    )
    cmd = guest_cmdline(stamp_mib=8, dirty_mib_s=1, hb_ms=250, disk=disk)

    def argv(tag: str, image: Path, *, incoming: bool) -> list[str]:
        return guest_argv(
            kernel,
            initrd,
            cmd,
            qmp=work / f"{tag}.qmp",
            console=work / f"{tag}.con",
            incoming=incoming,
            extra=disk_argv(BareDisk(image)),
        )

    async with BareQemu(argv("src", src_img, incoming=False), work / "src.qmp") as src:
        before = await poll_heartbeat(_reader(work / "src.con"), timeout=60)
        while before.disk is None or not before.disk.ready or before.disk.written < 20:
            before = await poll_heartbeat(_reader(work / "src.con"), after=before)
        dst, hop = await bare_storage_hop(
            src, argv("dst", dst_img, incoming=True), work / "dst.qmp", [(BareDisk(dst_img), SIZE)]
        )
        try:
            last_src = last_heartbeat(_console(work / "src.con"))
            assert last_src is not None
            after = await poll_heartbeat(_reader(work / "dst.con"), after=last_src, timeout=30)
            # Another full read-back on the destination, of blocks that came over the mirror.
            while after.disk is None or after.disk.verified < last_src.disk.verified + BLOCKS:  # type: ignore[union-attr]
                after = await poll_heartbeat(_reader(work / "dst.con"), after=after)
            check_continuity(before, after)
            assert after.disk.written > last_src.disk.written  # type: ignore[union-attr]
        finally:
            await dst.stop()
    assert hop.disk_bytes >= BLOCKS * DISK_BLOCK
    src_report = verify_disk_image(src_img, blocks=BLOCKS)
    dst_report = verify_disk_image(dst_img, blocks=BLOCKS)
    src_report.check()
    dst_report.check()
    # The source's image as it stopped at the switchover; the copy only went on from there.
    check_no_lost_writes(src_report, dst_report)
    assert dst_report.max_gen > 1
