"""
The test guest's disk from the host: the heartbeat's disk counters, the <disk> XML and
kernel options of GuestDisk, and the offline verifier of stamped images (which must be
able to fail: misplaced, stale-torn and garbage blocks are each caught).
"""

from __future__ import annotations

import os
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmferry.errors import VmferryError
from vmferry.testguest import (
    DiskCounters,
    GuestDisk,
    Heartbeat,
    check_continuity,
    guest_cmdline,
    guest_xml,
    last_heartbeat,
)
from vmferry.testing import Host
from vmferry.testing.disk import (
    DISK_BLOCK,
    block_bytes,
    block_generation,
    check_no_lost_writes,
    create_image,
    qemu_img_compare,
    stamp_image,
    verify_disk_image,
)

HB = (
    "VMFERRY-HB boot=00112233aabbccdd seq=7 dirtied=512 verified=4096 errors=0 up_ms=2200"
    " disk_ready=1 disk_written=40 disk_verified=300 disk_errors=2 disk_ioerrors=1\n"
)


def test_heartbeat_with_disk_counters() -> None:
    hb = last_heartbeat(HB)
    assert hb is not None and hb.seq == 7 and hb.up_ms == 2200
    assert hb.disk == DiskCounters(ready=True, written=40, verified=300, errors=2, ioerrors=1)
    plain = last_heartbeat(HB.split(" disk_ready")[0] + "\n")
    assert plain is not None and plain.disk is None
    # A torn disk part is not a heartbeat with made-up counters.
    assert last_heartbeat(HB.replace(" disk_ioerrors=1", "")) is None


def test_continuity_fails_on_disk_errors() -> None:
    a = Heartbeat("00112233aabbccdd", 1, 0, 0, 0, 100, DiskCounters(True, 0, 0, 0, 0))
    check_continuity(a, Heartbeat(a.boot, 2, 0, 0, 0, 200, DiskCounters(True, 5, 9, 0, 0)))
    with pytest.raises(AssertionError, match="1 block"):
        check_continuity(a, Heartbeat(a.boot, 2, 0, 0, 0, 200, DiskCounters(True, 5, 9, 1, 0)))
    with pytest.raises(AssertionError, match="1 I/O error"):
        check_continuity(a, Heartbeat(a.boot, 2, 0, 0, 0, 200, DiskCounters(True, 5, 9, 0, 1)))


def test_guest_disk_xml_and_cmdline() -> None:
    d = GuestDisk(file="/srv/img/a b.qcow2", format="qcow2", blocks=64, mib_s=0.5, cache="none")
    cmd = guest_cmdline(disk=d)
    for opt in (
        "vmferry.disk=/dev/vda",
        "vmferry.disk_blocks=64",
        "vmferry.disk_mib_s=0.5",
        "vmferry.disk_verify_mib_s=4",
    ):
        assert opt in cmd.split()
    assert "vmferry.disk_init" not in cmd
    assert "vmferry.disk" not in guest_cmdline()
    disk = ET.fromstring(d.xml())
    assert (disk.get("type"), disk.get("device")) == ("file", "disk")
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}  # type: ignore[union-attr]
    assert disk.find("source").attrib == {"file": "/srv/img/a b.qcow2"}  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    vol = ET.fromstring(
        GuestDisk(pool="default", volume="g.raw", target="vdb", host_init=True).xml()
    )
    assert vol.get("type") == "volume"
    assert vol.find("source").attrib == {"pool": "default", "volume": "g.raw"}  # type: ignore[union-attr]


def test_guest_xml_with_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setenv("VMFERRY_GUEST_DIR", str(tmp_path))
    root = ET.fromstring(guest_xml("g", disk=GuestDisk(file="/srv/d.raw")))
    disks = root.findall("devices/disk")
    assert len(disks) == 1 and disks[0].find("source").get("file") == "/srv/d.raw"  # type: ignore[union-attr]
    assert "vmferry.disk=/dev/vda" in (root.findtext("os/cmdline") or "")
    assert ET.fromstring(guest_xml("g")).findall("devices/disk") == []


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"file": "rel.raw"},
        {"file": "/a", "pool": "p", "volume": "v"},
        {"pool": "p"},
        {"pool": "p", "volume": "../etc/passwd"},
        {"pool": "p", "volume": "a/b"},
        {"file": "/a", "format": "vmdk"},
        {"file": "/a", "target": "sda"},
        {"file": "/a", "target": "vda' bus='x"},
        {"file": "/a", "blocks": 0},
        {"file": "/a", "mib_s": -1},
    ],
)
def test_guest_disk_refuses_nonsense(kw: dict[str, object]) -> None:
    with pytest.raises(VmferryError):
        GuestDisk(**kw)  # type: ignore[arg-type]


def test_host_config_has_image_roots(tmp_path: Path) -> None:
    host = Host(tmp_path, "host0", 50016, image_roots=[tmp_path / "img", tmp_path / 'q"x'])
    roots = tomllib.loads(host.config_text())["paths"]["roots"]
    assert roots[1:] == [str(tmp_path / "img"), str(tmp_path / 'q"x')]


# --- the block format and the offline verifier -------------------------------------------------


def test_block_format_is_self_describing() -> None:
    b = block_bytes(5, 3)
    assert len(b) == DISK_BLOCK and b[:8] == b"VMFDISK1"
    assert block_generation(b, 5) == 3
    assert block_generation(b, 6) is None  # another block's stamp
    assert block_bytes(5, 4) != b and block_bytes(6, 3)[32:] != b[32:]
    torn = b[:2048] + block_bytes(5, 4)[2048:]
    assert block_generation(torn, 5) is None
    flipped = bytearray(b)
    flipped[4000] ^= 1
    assert block_generation(bytes(flipped), 5) is None
    with pytest.raises(ValueError):
        block_bytes(0, 0)


def _raw(tmp_path: Path, blocks: int, stamped: int) -> Path:
    return create_image(tmp_path / "d.raw", blocks * DISK_BLOCK, stamp_blocks=stamped)


def test_verifier_accepts_a_stamped_image(tmp_path: Path) -> None:
    img = _raw(tmp_path, 64, 48)
    with open(img, "r+b") as f:  # later generations, as the guest's re-stamps leave them
        f.seek(7 * DISK_BLOCK)
        f.write(block_bytes(7, 9))
    r = verify_disk_image(img)
    assert (r.blocks, r.stamped, r.unstamped, r.max_gen, r.ok) == (64, 48, 16, 9, True)
    r.check(all_stamped=False)
    with pytest.raises(AssertionError, match="16 of 64 disk block"):
        r.check()
    verify_disk_image(img, blocks=48).check()
    with pytest.raises(VmferryError):
        verify_disk_image(img, blocks=65)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda: block_bytes(11, 1), "misplaced"),
        (lambda: block_bytes(10, 2)[:100] + block_bytes(10, 3)[100:], "torn or corrupted"),
        (lambda: os.urandom(DISK_BLOCK), "no stamp"),
    ],
)
def test_verifier_catches_a_bad_block(tmp_path: Path, damage, why: str) -> None:  # type: ignore[no-untyped-def]
    img = _raw(tmp_path, 32, 32)
    with open(img, "r+b") as f:
        f.seek(10 * DISK_BLOCK)
        f.write(damage())
    r = verify_disk_image(img)
    assert not r.ok and r.bad_count == 1 and r.bad[0][0] == 10 and why in r.bad[0][1]
    with pytest.raises(AssertionError, match="1 of 32 disk block"):
        r.check()


def test_qcow2_images_verify_and_compare(tmp_path: Path) -> None:
    q = create_image(tmp_path / "d.qcow2", 1 << 20, fmt="qcow2", stamp_blocks=100)
    r = verify_disk_image(q, blocks=100)
    assert (r.stamped, r.ok) == (100, True)
    raw = _raw(tmp_path, 256, 100)
    assert qemu_img_compare(q, raw).identical
    stamp_image(raw, 101)
    diff = qemu_img_compare(q, raw)
    assert not diff.identical and diff.output
    with pytest.raises(VmferryError, match="qemu-img compare"):
        qemu_img_compare(q, tmp_path / "missing.raw")


def test_daemon_parses_guest_disk_xml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmferry.domain.xml import parse_domain_xml

    for name in ("vmlinuz", "initramfs.cpio.gz"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setenv("VMFERRY_GUEST_DIR", str(tmp_path))
    vol = GuestDisk(pool="default", volume="g.qcow2", format="qcow2", cache="none")
    (d,) = parse_domain_xml(guest_xml("g", disk=vol)).devices.disks
    assert (d.type, d.source_pool, d.source_volume, d.driver_type, d.cache, d.target_dev) == (
        "volume", "default", "g.qcow2", "qcow2", "none", "vda",
    )  # fmt: skip
    (f,) = parse_domain_xml(guest_xml("g", disk=GuestDisk(file="/srv/x.raw"))).devices.disks
    assert (f.type, f.source_file, f.driver_type, f.target_bus) == (
        "file", "/srv/x.raw", "raw", "virtio",
    )  # fmt: skip


def test_no_lost_writes_between_source_and_copy(tmp_path: Path) -> None:
    src = create_image(tmp_path / "src.raw", 8 * DISK_BLOCK, stamp_blocks=8)
    dst = create_image(tmp_path / "dst.raw", 8 * DISK_BLOCK, stamp_blocks=8)
    for path, block, gen in ((src, 3, 5), (dst, 3, 6), (dst, 4, 2)):  # the copy went on
        with open(path, "r+b") as f:
            f.seek(block * DISK_BLOCK)
            f.write(block_bytes(block, gen))
    before, after = verify_disk_image(src), verify_disk_image(dst)
    assert before.generations == [1, 1, 1, 5, 1, 1, 1, 1]
    check_no_lost_writes(before, after)
    with pytest.raises(AssertionError, match="block 3: generation 6 -> 5"):
        check_no_lost_writes(after, before)
