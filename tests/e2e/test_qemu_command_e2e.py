"""The QEMU command line: real QEMU started from it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.unit.test_qemu_command import UUID, domain_xml
from vmferry.domain import DomainDef, parse_domain_xml
from vmferry.errors import VmferryError
from vmferry.qemu.command import QemuPaths, build_argv

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="QEMU is not installed",
)


@contextlib.asynccontextmanager
async def running_qemu(d: DomainDef, tmp: Path, **kwargs: Any) -> AsyncIterator[QMPClient]:
    """Start QEMU with build_argv(d) and yield a connected QMP client; always kill it."""
    paths = QemuPaths(qmp_socket=tmp / "qmp", console_log=tmp / "console.log")
    with (tmp / "qemu.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *build_argv(d, paths, **kwargs),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    qmp = QMPClient(d.name)
    try:
        for _ in range(200):
            if paths.qmp_socket.exists() or proc.returncode is not None:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
        if proc.returncode is not None:
            raise AssertionError(
                f"QEMU exited with {proc.returncode}: {(tmp / 'qemu.log').read_text()}"
            )
        await qmp.connect(str(paths.qmp_socket))
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


async def query(qmp: QMPClient, command: str) -> Any:
    return await qmp.execute(command)


@needs_qemu
@pytest.mark.qemu
async def test_real_qemu_minimal(tmp: Path) -> None:
    d = parse_domain_xml(domain_xml().replace("guest1", "vf-minimal"))
    async with running_qemu(d, tmp) as qmp:
        status = await query(qmp, "query-status")
        assert status["status"] == "prelaunch" and status["running"] is False
        assert await query(qmp, "query-name") == {"name": "vf-minimal"}
        assert (await query(qmp, "query-uuid"))["UUID"] == UUID
        summary = await query(qmp, "query-memory-size-summary")
        assert summary["base-memory"] == 64 * 1024 * 1024
        chardevs = {c["label"]: c["filename"] for c in await query(qmp, "query-chardev")}
        assert chardevs["charserial0"].startswith("pty:/dev/pts/")
        assert (tmp / "console.log").exists()


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["pc", "q35"])
async def test_real_qemu_devices(tmp: Path, machine: str) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp / "a,1.qcow2"), "64M")
    qemu_img("create", "-f", "raw", str(tmp / "ro.img"), "1M")
    qemu_img("create", "-f", "raw", str(tmp / "s.img"), "1M")
    ide = (
        ""
        if machine == "q35"
        else ("<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>")
    )
    xml = domain_xml(
        f"<disk type='file'><driver name='qemu' type='qcow2' cache='writethrough'/>"
        f"<source file='{tmp}/a,1.qcow2'/><target dev='vda'/></disk>"
        f"<disk type='file'><source file='{tmp}/ro.img'/><target dev='vdb'/><readonly/></disk>"
        f"<disk type='file'><driver name='qemu' type='raw' cache='unsafe'/>"
        f"<source file='{tmp}/s.img'/><target dev='sdb' bus='sata'/></disk>"
        f"<disk type='file' device='cdrom'><target dev='sdc' bus='sata'/></disk>{ide}"
        "<interface type='user'><mac address='52:54:00:12:34:56'/></interface>"
        "<interface type='user'><mac address='52:54:00:12:34:57'/><model type='e1000'/>"
        "</interface>"
        "<graphics type='vnc' autoport='yes'/><video><model type='vga'/></video>",
        machine=machine,
        extra="<features><acpi/></features>",
    ).replace("<memballoon model='none'/>", "<memballoon model='virtio'/>")
    d = parse_domain_xml(xml)
    async with running_qemu(d, tmp, incoming=True) as qmp:
        assert (await query(qmp, "query-status"))["status"] == "inmigrate"

        block = {b["qdev"]: b for b in await query(qmp, "query-block")}
        vda = block["/machine/peripheral/virtio-disk0/virtio-backend"]["inserted"]
        assert vda["drv"] == "qcow2" and vda["file"].endswith("a,1.qcow2")
        assert vda["ro"] is False
        vdb = block["/machine/peripheral/virtio-disk1/virtio-backend"]["inserted"]
        assert vdb["ro"] is True
        assert block["sata0-0-1"]["inserted"]["drv"] == "raw"
        assert "inserted" not in block["sata0-0-2"]  # empty tray
        if machine == "pc":
            assert "inserted" not in block["ide0-1-0"]

        pci = await query(qmp, "query-pci")
        ids = {dev.get("qdev_id") for bus in pci for dev in bus["devices"]}
        expected = {"video0", "virtio-disk0", "virtio-disk1", "net0", "net1", "balloon0"}
        assert expected <= ids
        assert ("sata0" in ids) == (machine == "pc")

        nets = await qmp.execute("qom-get", {"path": "/machine/peripheral/net0", "property": "mac"})
        assert nets == "52:54:00:12:34:56"
        vnc = await query(qmp, "query-vnc")
        assert vnc["enabled"] is True and vnc["host"] == "127.0.0.1"
        assert 5900 <= int(vnc["service"]) <= 5999


@needs_qemu
@pytest.mark.qemu
async def test_real_qemu_refuses_what_it_cannot_run(tmp: Path) -> None:
    # the argv check is not a stand-in for QEMU: prove the refused case really fails
    d = parse_domain_xml(
        domain_xml(
            f"<disk type='file'><source file='{tmp}/x.img'/><target dev='sda'/><readonly/></disk>"
        )
    )
    qemu_img("create", "-f", "raw", str(tmp / "x.img"), "1M")
    paths = QemuPaths(tmp / "qmp", tmp / "c.log")
    with pytest.raises(VmferryError):
        build_argv(d, paths)
    d.devices.disks[0].readonly = False
    argv = [a.replace('"read-only": false', '"read-only": true') for a in build_argv(d, paths)]
    assert any('"read-only": true' in a for a in argv)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode != 0
    assert b"read-only" in out, out
