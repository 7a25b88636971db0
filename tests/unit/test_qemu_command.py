"""The QEMU command line: argv content (tests/e2e/test_qemu_command_e2e.py starts QEMU from it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmferry.domain import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.command import QemuPaths, build_argv

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
PATHS = QemuPaths(qmp_socket=Path("/run/vf/g.qmp"), console_log=Path("/var/log/vf/g.console.log"))


def domain_xml(
    devices: str = "",
    *,
    machine: str = "pc",
    extra: str = "",
    dtype: str = "qemu",
    os_extra: str = "",
) -> str:
    return f"""<domain type='{dtype}'>
  <name>guest1</name>
  <uuid>{UUID}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>
  {extra}
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>"""


def argv_of(xml: str, **kwargs: Any) -> list[str]:
    return build_argv(parse_domain_xml(xml), PATHS, **kwargs)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def option_value(argv: list[str], option: str) -> str:
    (value,) = option_values(argv, option)
    return value


# -- argv content ------------------------------------------------------------------------


def test_basic_argv() -> None:
    xml = domain_xml(
        extra="<features><acpi/></features>",
        os_extra=(
            "<kernel>/k/vmlinuz</kernel><initrd>/k/initrd</initrd>"
            "<cmdline>console=ttyS0 a=b,c</cmdline>"
        ),
    )
    argv = argv_of(xml)
    assert argv[0] == "qemu-system-x86_64"
    assert option_value(argv, "-name") == "guest=guest1,debug-threads=on"
    assert option_value(argv, "-uuid") == UUID
    for flag in ("-no-user-config", "-nodefaults", "-S", "-no-shutdown"):
        assert flag in argv
    assert option_value(argv, "-display") == "none"
    assert option_value(argv, "-machine") == "pc"
    assert option_value(argv, "-accel") == "tcg"
    assert "-cpu" not in argv
    assert option_value(argv, "-m") == "size=65536k"
    assert option_value(argv, "-smp") == "1"
    assert option_value(argv, "-rtc") == "base=utc"
    assert "-no-reboot" not in argv
    assert option_value(argv, "-kernel") == "/k/vmlinuz"
    assert option_value(argv, "-initrd") == "/k/initrd"
    assert option_value(argv, "-append") == "console=ttyS0 a=b,c"
    assert "-boot" not in argv
    chardevs = option_values(argv, "-chardev")
    assert chardevs[0] == "socket,id=charmonitor,path=/run/vf/g.qmp,server=on,wait=off"
    assert option_value(argv, "-mon") == "chardev=charmonitor,id=monitor,mode=control"
    assert chardevs[1] == ("pty,id=charserial0,logfile=/var/log/vf/g.console.log,logappend=on")
    assert option_values(argv, "-device") == ["isa-serial,chardev=charserial0,id=serial0,index=0"]
    assert "-incoming" not in argv and "-vnc" not in argv and "-netdev" not in argv
    assert option_value(argv, "-msg") == "timestamp=on"


def test_machine_accel_cpu_and_lifecycle() -> None:
    argv = argv_of(
        domain_xml(
            dtype="kvm",
            machine="pc-q35-10.0",
            extra="<cpu mode='host-passthrough'/><clock offset='localtime'/>"
            "<on_reboot>destroy</on_reboot>",
            os_extra="<boot dev='network'/><boot dev='hd'/><boot dev='cdrom'/>",
        )
    )
    assert option_value(argv, "-machine") == "pc-q35-10.0,acpi=off"
    assert option_value(argv, "-accel") == "kvm"
    assert option_value(argv, "-cpu") == "host"
    assert option_value(argv, "-rtc") == "base=localtime"
    assert "-no-reboot" in argv
    assert option_value(argv, "-boot") == "order=ncd"

    assert option_value(argv_of(domain_xml(extra="<cpu mode='host-model'/>")), "-cpu") == "max"
    custom = argv_of(domain_xml(extra="<cpu mode='custom'><model>Nehalem</model></cpu>"))
    assert option_value(custom, "-cpu") == "Nehalem"


def test_host_passthrough_needs_kvm() -> None:
    with pytest.raises(VmferryError) as info:
        argv_of(domain_xml(extra="<cpu mode='host-passthrough'/>"))
    assert info.value.code == ErrorCode.CONFIG_UNSUPPORTED


def test_emulator_choice() -> None:
    xml = domain_xml("<emulator>/opt/q/bin/qemu</emulator>")
    assert argv_of(xml)[0] == "/opt/q/bin/qemu"
    assert argv_of(xml, emulator="/usr/local/bin/qemu")[0] == "/usr/local/bin/qemu"


def test_trace_events_come_after_the_timestamped_messages() -> None:
    argv = argv_of(domain_xml(), trace_events=["vmstate_downtime_checkpoint", "migrate_*"])
    assert option_values(argv, "-trace") == ["vmstate_downtime_checkpoint", "migrate_*"]
    assert option_value(argv, "-msg") == "timestamp=on"  # each event's line carries the time
    assert "-trace" not in argv_of(domain_xml())


def test_incoming() -> None:
    argv = argv_of(domain_xml(), incoming=True)
    assert option_value(argv, "-incoming") == "defer"


def test_paths_with_commas_are_escaped() -> None:
    paths = QemuPaths(qmp_socket=Path("/r/a,b.qmp"), console_log=Path("/l/c,d.log"))
    argv = build_argv(parse_domain_xml(domain_xml()), paths)
    chardevs = option_values(argv, "-chardev")
    assert "path=/r/a,,b.qmp," in chardevs[0]
    assert "logfile=/l/c,,d.log," in chardevs[1]


def test_serial_backends() -> None:
    xml = domain_xml().replace(
        "<serial type='pty'><target port='0'/></serial>\n"
        "    <console type='pty'><target type='serial' port='0'/></console>",
        "<serial type='file'><source path='/l/s0.log' append='on'/><target port='0'/></serial>"
        "<serial type='unix'><source mode='bind' path='/r/s1.sock'/><target port='1'/></serial>"
        "<serial type='unix'><source mode='connect' path='/r/s2.sock'/><target port='2'/></serial>"
        "<serial type='pty'><target port='3'/></serial>",
    )
    argv = argv_of(xml)
    assert option_values(argv, "-chardev")[1:-1] == [
        "file,id=charserial0,path=/l/s0.log,append=on,"
        "logfile=/var/log/vf/g.console.log,logappend=on",
        "socket,id=charserial1,path=/r/s1.sock,server=on,wait=off",
        "socket,id=charserial2,path=/r/s2.sock",
        "pty,id=charserial3",
    ]
    assert option_values(argv, "-device") == [
        f"isa-serial,chardev=charserial{i},id=serial{i},index={i}" for i in range(4)
    ]


def test_disks() -> None:
    argv = argv_of(
        domain_xml(
            "<disk type='file'><driver name='qemu' type='qcow2' cache='none'/>"
            "<source file='/i/a,b.qcow2'/><target dev='vda'/></disk>"
            "<disk type='file'><source file='/i/ro.img'/><target dev='vdb'/><readonly/></disk>"
            "<disk type='file'><driver name='qemu' type='raw' cache='writethrough'/>"
            "<source file='/i/h.img'/><target dev='hdc' bus='ide'/></disk>"
            "<disk type='file' device='cdrom'><target dev='sdb' bus='sata'/></disk>"
        )
    )
    blockdevs = [json.loads(b) for b in option_values(argv, "-blockdev")]
    assert blockdevs[0] == {
        "driver": "file",
        "filename": "/i/a,b.qcow2",
        "node-name": "file-vda",
        "auto-read-only": True,
        "discard": "unmap",
        "cache": {"direct": True, "no-flush": False},
    }
    assert blockdevs[1] == {
        "driver": "qcow2",
        "node-name": "fmt-vda",
        "file": "file-vda",
        "read-only": False,
        "cache": {"direct": True, "no-flush": False},
    }
    assert blockdevs[3]["read-only"] is True and "cache" not in blockdevs[3]
    assert blockdevs[5]["cache"] == {"direct": False, "no-flush": False}
    assert len(blockdevs) == 6  # the empty CD-ROM has no backend
    devices = option_values(argv, "-device")[1:]
    assert devices == [
        "ahci,id=sata0",
        "virtio-blk-pci,drive=fmt-vda,write-cache=on,id=virtio-disk0",
        "virtio-blk-pci,drive=fmt-vdb,id=virtio-disk1",
        "ide-hd,bus=ide.1,unit=0,drive=fmt-hdc,write-cache=off,id=ide0-1-0",
        "ide-cd,bus=sata0.1,id=sata0-0-1",
    ]


def test_q35_sata_uses_the_builtin_ahci() -> None:
    argv = argv_of(
        domain_xml(
            "<disk type='file'><source file='/i/a.img'/><target dev='sdc'/></disk>", machine="q35"
        )
    )
    devices = option_values(argv, "-device")
    assert "ahci,id=sata0" not in devices
    assert devices[-1] == "ide-hd,bus=ide.2,drive=fmt-sdc,id=sata0-0-2"


@pytest.mark.parametrize(
    ("devices", "machine", "needle"),
    [
        ("<disk type='file'><source file='/a'/><target dev='hda'/></disk>", "q35", "no IDE"),
        ("<disk type='file'><source file='/a'/><target dev='hde'/></disk>", "pc", "hda to hdd"),
        ("<disk type='file'><source file='/a'/><target dev='sdg'/></disk>", "pc", "sda to sdf"),
        (
            "<disk type='file'><source file='/a'/><target dev='sda'/><readonly/></disk>",
            "pc",
            "read-only",
        ),
    ],
)
def test_unsupported_disks(devices: str, machine: str, needle: str) -> None:
    with pytest.raises(VmferryError) as info:
        argv_of(domain_xml(devices, machine=machine))
    assert info.value.code == ErrorCode.CONFIG_UNSUPPORTED
    assert needle in info.value.message


def test_network_graphics_video_balloon() -> None:
    xml = domain_xml(
        "<interface type='user'><mac address='52:54:00:00:00:01'/></interface>"
        "<interface type='user'><mac address='52:54:00:00:00:02'/><model type='e1000'/>"
        "</interface>"
        "<interface type='user'><mac address='52:54:00:00:00:03'/><model type='rtl8139'/>"
        "</interface>"
        "<graphics type='vnc' autoport='yes'/>"
        "<video><model type='vga'/></video>"
    ).replace("<memballoon model='none'/>", "<memballoon model='virtio'/>")
    argv = argv_of(xml)
    assert option_values(argv, "-netdev") == [
        "user,id=hostnet0",
        "user,id=hostnet1",
        "user,id=hostnet2",
    ]
    assert option_values(argv, "-device")[1:] == [
        "VGA,id=video0",
        "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:00:00:01",
        "e1000,netdev=hostnet1,id=net1,mac=52:54:00:00:00:02",
        "rtl8139,netdev=hostnet2,id=net2,mac=52:54:00:00:00:03",
        "virtio-balloon-pci,id=balloon0",
    ]
    assert option_value(argv, "-vnc") == "127.0.0.1:0,to=99"

    fixed = argv_of(domain_xml("<graphics type='vnc' port='5907' autoport='no' listen='::1'/>"))
    assert option_value(fixed, "-vnc") == "[::1]:7"


def test_qmp_socket_named_on_the_command_line_even_when_passed_as_fd() -> None:
    """A restart finds a QEMU it lost track of by its QMP socket, which may be a passed fd."""
    from vmferry.qemu.command import qmp_marker

    argv = argv_of(domain_xml())
    assert f"null,id={qmp_marker(PATHS.qmp_socket)}" in option_values(argv, "-chardev")
    assert qmp_marker("/a/g.qmp") != qmp_marker("/b/g.qmp")
