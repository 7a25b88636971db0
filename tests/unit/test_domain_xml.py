"""Domain XML: parsing, refusals, formatting round trip, migratable XML, ABI check."""

from __future__ import annotations

import copy
import re
import uuid
import xml.etree.ElementTree as ET

import pytest

from vmferry.domain import (
    DomainDef,
    check_abi_stability,
    format_domain_xml,
    parse_domain_xml,
)
from vmferry.errors import ErrorCode, VmferryError

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"

GUEST_XML = f"""<domain type='qemu'>
  <name>guest1</name>
  <uuid>{UUID}</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/abs/vmlinuz</kernel>
    <initrd>/abs/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vmferry.stamp_mib=32</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""

RICH_XML = """<?xml version='1.0' encoding='UTF-8'?>
<!-- a comment is fine -->
<domain type='kvm'>
  <name>rich.guest+1</name>
  <uuid>1B4E28BA2FA111D2883F0016D3CCA428</uuid>
  <title>A rich &amp; shiny guest</title>
  <description>
    Several lines of
    description &lt;kept&gt; as written.
  </description>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='M'>1536</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <boot dev='cdrom'/>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <cpu mode='custom'><model>Skylake-Client</model></cpu>
  <clock offset='localtime'/>
  <on_poweroff>preserve</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>restart</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/images/rich.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/images/data,1.img'/>
      <target dev='vdb'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sdc' bus='sata'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:AB:cd:01'/>
      <model type='e1000'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:ab:cd:02'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/rich-serial.log' append='on'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='/run/rich-serial1.sock'/>
      <target port='1'/>
    </serial>
    <console type='file'>
      <source path='/var/log/rich-serial.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video><model type='vga'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def refused(text: str, code: ErrorCode) -> str:
    with pytest.raises(VmferryError) as info:
        parse_domain_xml(text)
    assert info.value.code == code, info.value.message
    return info.value.message


def edit(xml: str, old: str, new: str) -> str:
    assert old in xml, old
    return xml.replace(old, new, 1)


# -- parsing -------------------------------------------------------------------------------


def test_test_guest_xml_parses() -> None:
    d = parse_domain_xml(GUEST_XML)
    assert (d.type, d.name, d.uuid) == ("qemu", "guest1", UUID)
    assert d.memory_kib == d.current_memory_kib == 128 * 1024
    assert d.vcpus == 1
    assert (d.os.arch, d.os.machine, d.os.kernel, d.os.initrd) == (
        "x86_64",
        "pc",
        "/abs/vmlinuz",
        "/abs/initramfs.cpio.gz",
    )
    assert d.os.cmdline == "console=ttyS0 quiet panic=-1 vmferry.stamp_mib=32"
    assert d.features.acpi and d.features.apic
    assert d.cpu is None
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert [(s.type, s.target_port) for s in d.devices.serials] == [("pty", 0)]
    assert [(c.type, c.target_type) for c in d.devices.consoles] == [("pty", "serial")]
    assert d.devices.video == "none"
    assert d.devices.memballoon == "none"
    assert not d.devices.disks and not d.devices.interfaces and not d.devices.graphics


def test_rich_xml_parses() -> None:
    d = parse_domain_xml(RICH_XML)
    assert d.type == "kvm"
    assert d.uuid == "1b4e28ba-2fa1-11d2-883f-0016d3cca428"
    assert d.title == "A rich & shiny guest"
    assert "description <kept> as written." in d.description
    assert d.memory_kib == 2 * 1024 * 1024
    assert d.current_memory_kib == 1536 * 1024
    assert d.vcpus == 2
    assert d.os.machine == "pc-q35-10.0"
    assert d.os.boot_devs == ["cdrom", "hd"]
    assert d.features.acpi and not d.features.apic
    assert d.cpu is not None and (d.cpu.mode, d.cpu.model) == ("custom", "Skylake-Client")
    assert d.clock_offset == "localtime"
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("preserve", "destroy", "restart")
    vda, vdb, sdc = d.devices.disks
    assert (vda.driver_type, vda.cache, vda.target_bus, vda.readonly) == (
        "qcow2",
        "none",
        "virtio",
        False,
    )
    assert (vdb.source_file, vdb.target_bus, vdb.readonly) == (
        "/var/lib/images/data,1.img",
        "virtio",
        True,
    )
    assert (sdc.device, sdc.source_file, sdc.target_bus, sdc.readonly) == (
        "cdrom",
        "",
        "sata",
        True,
    )
    assert [(n.mac, n.model) for n in d.devices.interfaces] == [
        ("52:54:00:ab:cd:01", "e1000"),
        ("52:54:00:ab:cd:02", "virtio"),
    ]
    s0, s1 = d.devices.serials
    assert (s0.type, s0.path, s0.append, s0.target_port) == (
        "file",
        "/var/log/rich-serial.log",
        True,
        0,
    )
    assert (s1.type, s1.mode, s1.path, s1.target_port) == (
        "unix",
        "bind",
        "/run/rich-serial1.sock",
        1,
    )
    (g,) = d.devices.graphics
    assert (g.type, g.autoport, g.port, g.listen) == ("vnc", True, -1, "127.0.0.1")
    assert d.devices.video == "vga"
    assert d.devices.memballoon == "virtio"
    assert d.devices.emulator == "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize("xml", [GUEST_XML, RICH_XML], ids=["guest", "rich"])
def test_round_trip(xml: str) -> None:
    d = parse_domain_xml(xml)
    text = format_domain_xml(d)
    again = parse_domain_xml(text)
    assert again == d
    assert format_domain_xml(again) == text


def test_output_has_uuid_and_memory_in_kib() -> None:
    d = parse_domain_xml(edit(GUEST_XML, f"<uuid>{UUID}</uuid>", ""))
    root = ET.fromstring(format_domain_xml(d))
    assert root.findtext("uuid") == d.uuid
    memory = root.find("memory")
    assert memory is not None and memory.get("unit") == "KiB" and memory.text == "131072"
    current = root.find("currentMemory")
    assert current is not None and current.get("unit") == "KiB" and current.text == "131072"


def test_uuid_generated_when_absent() -> None:
    xml = edit(GUEST_XML, f"<uuid>{UUID}</uuid>", "")
    first, second = parse_domain_xml(xml), parse_domain_xml(xml)
    assert uuid.UUID(first.uuid).version == 4
    assert str(uuid.UUID(first.uuid)) == first.uuid
    assert first.uuid != second.uuid


def test_mac_generated_when_absent() -> None:
    xml = edit(GUEST_XML, "<video>", "<interface type='user'/><interface type='user'/><video>")
    d = parse_domain_xml(xml)
    macs = [nic.mac for nic in d.devices.interfaces]
    assert all(re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac) for mac in macs), macs
    assert [nic.model for nic in d.devices.interfaces] == ["virtio", "virtio"]
    # a generated MAC is written out and so survives a round trip
    assert parse_domain_xml(format_domain_xml(d)).devices.interfaces == d.devices.interfaces


@pytest.mark.parametrize(
    ("value", "unit", "kib"),
    [
        ("1048576", "b", 1024),
        ("1048577", "bytes", 1025),  # rounded up to a whole KiB
        ("1024", "KB", 1000),
        ("1000", "k", 1000),
        ("1000", "KiB", 1000),
        ("1000", None, 1000),
        ("3", "MB", 2930),  # 3,000,000 bytes
        ("3", "M", 3072),
        ("3", "MiB", 3072),
        ("2", "GB", 1953125),
        ("2", "G", 2097152),
        ("2", "GiB", 2097152),
        ("1", "TB", 976562500),
        ("1", "T", 1 << 30),
        ("1", "TiB", 1 << 30),
    ],
)
def test_memory_units(value: str, unit: str | None, kib: int) -> None:
    unit_attr = f" unit='{unit}'" if unit else ""
    xml = edit(GUEST_XML, "<memory unit='MiB'>128</memory>", f"<memory{unit_attr}>{value}</memory>")
    d = parse_domain_xml(xml)
    assert d.memory_kib == kib
    assert d.current_memory_kib == kib


def test_current_memory() -> None:
    xml = edit(GUEST_XML, "<vcpu>", "<currentMemory unit='MiB'>64</currentMemory><vcpu>")
    assert parse_domain_xml(xml).current_memory_kib == 65536
    too_big = edit(GUEST_XML, "<vcpu>", "<currentMemory unit='MiB'>129</currentMemory><vcpu>")
    assert "must not exceed" in refused(too_big, ErrorCode.XML_ERROR)


def test_vnc_listen_forms() -> None:
    base = "<graphics type='vnc' port='5901' autoport='no'><listen type='address' address='::1'/>"
    d = parse_domain_xml(edit(GUEST_XML, "<video>", base + "</graphics><video>"))
    (g,) = d.devices.graphics
    assert (g.autoport, g.port, g.listen) == (False, 5901, "::1")
    d = parse_domain_xml(edit(GUEST_XML, "<video>", "<graphics type='vnc'/><video>"))
    assert (d.devices.graphics[0].autoport, d.devices.graphics[0].listen) == (True, "127.0.0.1")


def test_console_without_serial_defines_the_serial() -> None:
    xml = edit(GUEST_XML, "<serial type='pty'><target port='0'/></serial>", "")
    d = parse_domain_xml(xml)
    assert [(s.type, s.target_port, s.target_type) for s in d.devices.serials] == [
        ("pty", 0, "isa-serial")
    ]
    assert parse_domain_xml(format_domain_xml(d)) == d


# -- refusals ------------------------------------------------------------------------------


def test_unknown_element_refused() -> None:
    xml = edit(GUEST_XML, "<video>", "<hostdev mode='subsystem' type='pci'/><video>")
    message = refused(xml, ErrorCode.CONFIG_UNSUPPORTED)
    assert message == "unsupported element <devices/hostdev> in domain XML"


def test_billion_laughs_refused() -> None:
    bomb = (
        '<?xml version="1.0"?>\n<!DOCTYPE domain [\n <!ENTITY lol "lol">\n'
        + "".join(
            f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n'
            for i in range(1, 10)
        )
        + "]>\n"
    )
    xml = bomb + edit(GUEST_XML, "<name>guest1</name>", "<name>&lol9;</name>")
    message = refused(xml, ErrorCode.XML_ERROR)
    assert "DTD" in message or "entit" in message


def test_external_entity_refused() -> None:
    xml = (
        '<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY ext SYSTEM "file:///etc/passwd">]>\n'
        + edit(
            GUEST_XML, "<name>guest1</name>", "<name>guest1</name><description>&ext;</description>"
        )
    )
    refused(xml, ErrorCode.XML_ERROR)


def test_entity_refused_even_without_dtd_forbidden() -> None:
    # an undefined entity reference is simply malformed
    xml = edit(GUEST_XML, "<name>guest1</name>", "<name>&ext;</name>")
    assert "malformed" in refused(xml, ErrorCode.XML_ERROR)


def test_oversize_refused() -> None:
    padding = "<!--" + "x" * (1024 * 1024) + "-->"
    message = refused(padding + GUEST_XML, ErrorCode.XML_ERROR)
    assert "larger than" in message
    # just under the limit is parsed
    filler = 1024 * 1024 - len(GUEST_XML.encode()) - len("<!---->")
    parse_domain_xml("<!--" + "x" * filler + "-->" + GUEST_XML)


def test_malformed_and_wrong_root() -> None:
    assert "malformed" in refused(GUEST_XML[:-20], ErrorCode.XML_ERROR)
    assert "expecting <domain>" in refused("<network/>", ErrorCode.XML_ERROR)
    assert "expecting <domain>" in refused("<d:domain xmlns:d='urn:x'/>", ErrorCode.XML_ERROR)


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-uuid",
        "1b4e28ba-2fa1-11d2-883f-0016d3cca42",  # one digit short
        "1b4e28ba-2fa1-11d2-883f-0016d3cca427a",
        "{1b4e28ba-2fa1-11d2-883f-0016d3cca427}",
        "1b4e28ba-2fa1-11d2-883f-0016d3cca4zz",
        "00000000-0000-0000-0000-000000000000",
    ],
)
def test_bad_uuid_refused(bad: str) -> None:
    assert "uuid" in refused(edit(GUEST_XML, UUID, bad), ErrorCode.XML_ERROR)


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden", "x" * 65, "sp ace", "é", "semi;colon"])
def test_bad_name_refused(bad: str) -> None:
    assert "name" in refused(edit(GUEST_XML, "guest1", bad), ErrorCode.XML_ERROR)


def test_name_limits() -> None:
    assert parse_domain_xml(edit(GUEST_XML, "guest1", "x" * 64)).name == "x" * 64
    assert parse_domain_xml(edit(GUEST_XML, "guest1", "A-z_0.9+")).name == "A-z_0.9+"


@pytest.mark.parametrize(
    ("memory", "needle"),
    [
        ("<memory unit='MiBs'>128</memory>", "unknown unit"),
        ("<memory unit='Q'>128</memory>", "unknown unit"),
        ("<memory unit='MiB'>12.5</memory>", "invalid"),
        ("<memory unit='MiB'>-1</memory>", "invalid"),
        ("<memory unit='MiB'>0</memory>", "greater than zero"),
        ("<memory unit='TiB'>999999</memory>", "too large"),
        ("", "missing element <memory>"),
    ],
)
def test_bad_memory_refused(memory: str, needle: str) -> None:
    xml = edit(GUEST_XML, "<memory unit='MiB'>128</memory>", memory)
    assert needle in refused(xml, ErrorCode.XML_ERROR)


# Edits of GUEST_XML that are refused: the error's code, and a part of its message.
REFUSED_EDITS: dict[ErrorCode, list[tuple[str, str, str]]] = {
    # what vmferry does not support (libvirt's VIR_ERR_CONFIG_UNSUPPORTED)
    ErrorCode.CONFIG_UNSUPPORTED: [
        ("<features><acpi/>", "<features><acpi/><pae/>", "unsupported element <features/pae>"),
        ("<vcpu>", "<iothreads>1</iothreads><vcpu>", "unsupported element <iothreads>"),
        ("<on_crash>", "<seclabel type='none'/><on_crash>", "unsupported element <seclabel>"),
        (
            "<target port='0'/></serial>",
            "<target port='0'/><alias name='x'/></serial>",
            "unsupported element <devices/serial/alias>",
        ),
        (
            "<domain type='qemu'>",
            "<domain type='qemu' xmlns:q='urn:q'><q:commandline/>",
            "unsupported element <commandline (namespaced)>",
        ),
        (
            "<domain type='qemu'>",
            "<domain type='qemu' id='3'>",
            "unsupported attribute 'id' of <domain>",
        ),
        (
            "<memballoon model='none'/>",
            "<memballoon model='none' autodeflate='on'/>",
            "unsupported attribute 'autodeflate' of <devices/memballoon>",
        ),
        (
            "<type arch='x86_64'",
            "<type arch='x86_64' foo='bar'",
            "unsupported attribute 'foo' of <os/type>",
        ),
        ("<acpi/>", "<acpi state='on'/>", "unsupported attribute 'state' of <features/acpi>"),
        ("<domain type='qemu'>", "<domain type='xen'>", "domain type 'xen'"),
        ("arch='x86_64'", "arch='aarch64'", "x86_64 guests only"),
        ("<memballoon model='none'/>", "<memballoon model='xen'/>", "'xen'"),
        ("<video><model type='none'/>", "<video><model type='qxl'/>", "'qxl'"),
        ("<video>", "<interface type='network'/><video>", "'network'"),
        ("<video>", "<graphics type='spice'/><video>", "'spice'"),
        ("<video>", "<graphics type='vnc' listen='0.0.0.0'/><video>", "loopback"),
        (
            "<video>",
            "<graphics type='vnc'><listen type='address' address='10.0.0.1'/></graphics><video>",
            "loopback",
        ),
        (
            "<video>",
            "<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk><video>",
            "'block'",
        ),
        (
            "<video>",
            "<disk type='file'><source file='/a'/><target dev='sda' bus='scsi'/></disk><video>",
            "'scsi'",
        ),
        ("<on_crash>destroy", "<on_crash>coredump-destroy", "coredump-destroy"),
    ],
    # values that are wrong in any libvirt (VIR_ERR_XML_ERROR)
    ErrorCode.XML_ERROR: [
        ("<vcpu>1</vcpu>", "<vcpu>0</vcpu>", "vcpu"),
        ("<vcpu>1</vcpu>", "<vcpu>two</vcpu>", "integer"),
        ("<name>guest1</name>", "<name>guest1</name><name>b</name>", "only once"),
        ("<kernel>/abs/vmlinuz</kernel>", "<kernel>vmlinuz</kernel>", "absolute"),
        ("<features><acpi/>", "<features>text<acpi/>", "unexpected text"),
        (
            "<video>",
            "<interface type='user'><mac address='01:00:5e:00:00:01'/></interface><video>",
            "multicast",
        ),
        (
            "<video>",
            "<interface type='user'><mac address='52:54:00:zz:00:01'/></interface><video>",
            "malformed MAC",
        ),
        (
            "<video>",
            "<disk type='file'><source file='/a'/><target dev='xda'/></disk><video>",
            "invalid disk target",
        ),
        ("<video>", "<disk type='file'><target dev='vda'/></disk><video>", "source"),
        (
            "<video>",
            "<disk type='file'><source file='/a'/><target dev='vda'/></disk>"
            "<disk type='file'><source file='/b'/><target dev='vda'/></disk><video>",
            "used twice",
        ),
        ("<video>", "<graphics type='vnc' port='80'/><video>", "port"),
    ],
}


@pytest.mark.parametrize(
    ("old", "new", "code", "needle"),
    [(old, new, code, needle) for code, rows in REFUSED_EDITS.items() for old, new, needle in rows],
)
def test_refused_edits(old: str, new: str, code: ErrorCode, needle: str) -> None:
    assert needle in refused(edit(GUEST_XML, old, new), code)


def test_console_must_match_serial() -> None:
    xml = edit(
        GUEST_XML, "<console type='pty'>", "<console type='file'><source path='/tmp/x.log'/>"
    )
    assert "same backend" in refused(xml, ErrorCode.CONFIG_UNSUPPORTED)


# -- migratable XML ------------------------------------------------------------------------


def test_migratable_drops_runtime_data() -> None:
    d = parse_domain_xml(edit(GUEST_XML, "<video>", "<graphics type='vnc' autoport='yes'/><video>"))
    # what the daemon fills in while the domain runs
    d.devices.serials[0].path = d.devices.consoles[0].path = "/dev/pts/7"
    d.devices.graphics[0].port = 5903
    live = format_domain_xml(d)
    assert "/dev/pts/7" in live and "5903" in live
    assert parse_domain_xml(live) == d

    text = format_domain_xml(d, migratable=True)
    assert "/dev/pts/7" not in text and "5903" not in text
    dst = parse_domain_xml(text)
    assert dst.devices.serials[0].path == "" and dst.devices.graphics[0].port == -1
    check_abi_stability(d, dst)
    # everything else survives
    expected = copy.deepcopy(d)
    expected.devices.serials[0].path = expected.devices.consoles[0].path = ""
    expected.devices.graphics[0].port = -1
    assert dst == expected


def test_migratable_keeps_fixed_vnc_port_and_file_paths() -> None:
    d = parse_domain_xml(RICH_XML)
    d.devices.graphics[0].autoport = False
    d.devices.graphics[0].port = 5910
    dst = parse_domain_xml(format_domain_xml(d, migratable=True))
    assert dst == d


# -- ABI stability ------------------------------------------------------------------------


def _host_side_changes(d: DomainDef) -> DomainDef:
    dst = copy.deepcopy(d)
    dst.title = "other title"
    dst.description = "other description"
    dst.devices.emulator = "/opt/qemu/bin/qemu-system-x86_64"
    dst.devices.disks[0].source_file = "/srv/dst/rich.qcow2"
    dst.devices.disks[0].cache = "writeback"
    dst.devices.serials[0].path = dst.devices.consoles[0].path = "/var/log/elsewhere.log"
    dst.devices.graphics[0].listen = "::1"
    dst.on_poweroff = "destroy"
    return dst


def test_abi_check_passes_for_host_side_changes() -> None:
    src = parse_domain_xml(RICH_XML)
    check_abi_stability(src, src)
    dst = _host_side_changes(src)
    check_abi_stability(src, parse_domain_xml(format_domain_xml(dst)))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda d: setattr(d, "name", "other"),
            "name 'other' does not match source 'rich.guest+1'",
        ),
        (lambda d: setattr(d, "uuid", str(uuid.uuid4())), "uuid"),
        (lambda d: setattr(d, "type", "qemu"), "type 'qemu' does not match source 'kvm'"),
        (lambda d: setattr(d.os, "machine", "pc"), "machine type 'pc'"),
        (lambda d: setattr(d, "memory_kib", 1024), "memory '1024' does not match source '2097152'"),
        (lambda d: setattr(d, "vcpus", 4), "vCPU count"),
        (lambda d: setattr(d, "cpu", None), "CPU"),
        (
            lambda d: setattr(d.features, "apic", True),
            "APIC feature 'on' does not match source 'off'",
        ),
        (lambda d: setattr(d, "clock_offset", "utc"), "clock offset"),
        (lambda d: d.devices.disks.pop(), "disk count '2' does not match source '3'"),
        (lambda d: setattr(d.devices.disks[1], "target_dev", "vdc"), "disk 1 target 'vdc'"),
        (lambda d: setattr(d.devices.disks[0], "target_bus", "sata"), "disk vda bus"),
        (lambda d: setattr(d.devices.disks[1], "readonly", False), "disk vdb read-only"),
        (lambda d: setattr(d.devices.interfaces[0], "mac", "52:54:00:00:00:09"), "interface 0 MAC"),
        (lambda d: setattr(d.devices.interfaces[1], "model", "rtl8139"), "interface 1 model"),
        (lambda d: d.devices.interfaces.reverse(), "interface 0 MAC"),
        (lambda d: d.devices.serials.pop(), "serial count"),
        (lambda d: d.devices.graphics.clear(), "graphics count"),
        (lambda d: setattr(d.devices, "video", "virtio"), "video model 'virtio'"),
        (lambda d: setattr(d.devices, "memballoon", "none"), "memballoon model 'none'"),
    ],
)
def test_abi_check_refuses_guest_visible_changes(change: object, needle: str) -> None:
    src = parse_domain_xml(RICH_XML)
    dst = _host_side_changes(src)
    assert callable(change)
    change(dst)
    with pytest.raises(VmferryError) as info:
        check_abi_stability(src, dst)
    assert info.value.code == ErrorCode.CONFIG_UNSUPPORTED
    assert info.value.message.startswith("Target domain ")
    assert needle in info.value.message, info.value.message
