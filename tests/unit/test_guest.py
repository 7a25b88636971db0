"""
The test guest: its console protocol, its XML, and that it really detects
broken memory (tests/e2e/test_guest_e2e.py boots it).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmferry.errors import VmferryError
from vmferry.testguest import (
    Heartbeat,
    check_continuity,
    count_errors_lines,
    guest_paths,
    guest_xml,
    last_heartbeat,
    parse_heartbeats,
)

HB1 = "VMFERRY-HB boot=00112233aabbccdd seq=1 dirtied=0 verified=0 errors=0 up_ms=1700"
HB2 = "VMFERRY-HB boot=00112233aabbccdd seq=2 dirtied=512 verified=4096 errors=0 up_ms=2200"


# --- console protocol ------------------------------------------------------------------------


def test_parse_heartbeats_ignores_noise_crlf_and_torn_tail() -> None:
    text = (
        "[    0.0] Linux version 6.1\r\n"
        "VMFERRY-READY boot=00112233aabbccdd pages=8192 stamp_ms=100\r\n"
        f"{HB1}\r\n"
        "VMFERRY-ERR page=7 gen=3\n"
        f"{HB2}\n"
        "VMFERRY-HB boot=00112233aabbccdd seq=3 dirtied=10"  # torn: no newline yet
    )
    beats = parse_heartbeats(text)
    assert beats == [
        Heartbeat("00112233aabbccdd", 1, 0, 0, 0, 1700),
        Heartbeat("00112233aabbccdd", 2, 512, 4096, 0, 2200),
    ]
    assert last_heartbeat(text) == beats[-1]
    assert last_heartbeat("nothing here\n") is None
    assert count_errors_lines(text) == 1
    # A torn line must not yield a heartbeat with a truncated number.
    assert parse_heartbeats(HB2[:-2]) == []
    assert last_heartbeat(HB2[:-2] + "\n") == Heartbeat("00112233aabbccdd", 2, 512, 4096, 0, 22)


def test_check_continuity() -> None:
    a = Heartbeat("00112233aabbccdd", 5, 100, 1000, 0, 3000)
    check_continuity(a, Heartbeat(a.boot, 9, 200, 2000, 0, 5000))
    with pytest.raises(AssertionError, match="boot id changed"):
        check_continuity(a, Heartbeat("ffffffffffffffff", 9, 0, 0, 0, 5000))
    with pytest.raises(AssertionError, match="did not advance"):
        check_continuity(a, Heartbeat(a.boot, 5, 100, 1000, 0, 3000))
    with pytest.raises(AssertionError, match="wrong content"):
        check_continuity(a, Heartbeat(a.boot, 9, 200, 2000, 1, 5000))


def test_guest_paths_missing_says_make_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(VmferryError, match="make guest"):
        guest_paths(tmp_path)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"i")
    monkeypatch.setenv("VMFERRY_GUEST_DIR", str(tmp_path))
    assert guest_paths() == (tmp_path / "vmlinuz", tmp_path / "initramfs.cpio.gz")


def test_guest_xml_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"i")
    monkeypatch.setenv("VMFERRY_GUEST_DIR", str(tmp_path))
    root = ET.fromstring(
        guest_xml(
            "g<1>",
            memory_mib=256,
            stamp_mib=64,
            dirty_mib_s=0.5,
            hb_ms=250,
            vcpus=2,
            uuid="6b7e3c0a-3f0e-4d7b-9a43-1f3e5c2d9b10",
            extra_cmdline="vmferry.corrupt_after=3",
        )
    )
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "g<1>"
    assert root.findtext("uuid") == "6b7e3c0a-3f0e-4d7b-9a43-1f3e5c2d9b10"
    mem = root.find("memory")
    assert mem is not None and mem.get("unit") == "MiB" and mem.text == "256"
    assert root.findtext("vcpu") == "2"
    typ = root.find("os/type")
    assert typ is not None and typ.text == "hvm"
    assert (typ.get("arch"), typ.get("machine")) == ("x86_64", "pc")
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    assert root.findtext("os/initrd") == str(tmp_path / "initramfs.cpio.gz")
    args = (root.findtext("os/cmdline") or "").split()
    assert args[:3] == ["console=ttyS0", "quiet", "panic=-1"]
    for want in (
        "vmferry.stamp_mib=64",
        "vmferry.dirty_mib_s=0.5",
        "vmferry.hb_ms=250",
        "vmferry.corrupt_after=3",
    ):
        assert want in args
    assert root.find("features/acpi") is not None and root.find("features/apic") is not None
    assert [root.findtext(t) for t in ("on_poweroff", "on_reboot", "on_crash")] == [
        "destroy",
        "restart",
        "destroy",
    ]
    assert [c.tag for c in root.find("devices") or []] == [
        "serial",
        "console",
        "video",
        "memballoon",
    ]
    assert "<uuid>" not in guest_xml("plain")
    with pytest.raises(VmferryError):
        guest_xml("small", memory_mib=32, stamp_mib=32)
