"""Domain XML: safe parsing, validation, formatting, and the migration ABI check.

This is the part of libvirt's ``domain_conf.c`` that vmferry needs. The XML
comes from clients, so it is parsed with :mod:`defusedxml` (no DTDs, no
entities, no external references) and everything outside the supported
subset is refused with :data:`~vmferry.errors.ErrorCode.CONFIG_UNSUPPORTED`,
never silently dropped: a guest must not migrate or boot with less hardware
than its owner asked for.

Error codes: malformed XML or an invalid value is
:data:`~vmferry.errors.ErrorCode.XML_ERROR`; well-formed configuration vmferry
does not support is :data:`~vmferry.errors.ErrorCode.CONFIG_UNSUPPORTED`.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import defusedxml
import defusedxml.ElementTree as SafeET

from vmferry.domain import model
from vmferry.domain.model import (
    CharDef,
    CpuDef,
    Devices,
    DiskDef,
    DomainDef,
    FeaturesDef,
    GraphicsDef,
    InterfaceDef,
    OsDef,
)
from vmferry.domain.storage_names import check_pool_name, check_volume_name
from vmferry.domain.units import MAX_MEMORY_KIB, unit_scale
from vmferry.errors import ErrorCode, VmferryError

MAX_XML_BYTES = 1024 * 1024
MAX_VCPUS = 4096

_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# Machine and CPU model names end up inside QEMU options: keep them to QEMU's own charset.
_QEMU_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TARGET_DEV_RE = re.compile(r"(vd|sd|hd)([a-z]{1,3})")
_BUS_BY_PREFIX = {"vd": "virtio", "sd": "sata", "hd": "ide"}


def _xml_error(message: str) -> VmferryError:
    return VmferryError(ErrorCode.XML_ERROR, message)


def _unsupported(message: str) -> VmferryError:
    return VmferryError(ErrorCode.CONFIG_UNSUPPORTED, message)


# -- parsing helpers -------------------------------------------------------------------------


class _Node:
    """An element being parsed; remembers what was read so leftovers can be refused."""

    def __init__(self, el: ET.Element, path: str) -> None:
        self.el = el
        self.path = path
        self._seen_attrs: set[str] = set()
        self._seen_children: set[int] = set()

    def _child_path(self, tag: str) -> str:
        return tag if self.path == "domain" else f"{self.path}/{tag}"

    def attr(self, name: str, default: str | None = None) -> str | None:
        self._seen_attrs.add(name)
        return self.el.attrib.get(name, default)

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        """Attribute *name*, which must be one of *allowed* (or *default* when absent)."""
        value = self.attr(name, default)
        if value is None:
            raise _xml_error(f"missing attribute '{name}' of <{self.path}>")
        if value not in allowed:
            raise _unsupported(
                f"unsupported value '{value}' of attribute '{name}' of <{self.path}> "
                f"(supported: {', '.join(allowed)})"
            )
        return value

    def children(self, tag: str) -> list[_Node]:
        found = []
        for i, el in enumerate(self.el):
            if el.tag == tag:
                self._seen_children.add(i)
                found.append(_Node(el, self._child_path(tag)))
        return found

    def child(self, tag: str) -> _Node | None:
        found = self.children(tag)
        if len(found) > 1:
            raise _xml_error(f"element <{found[1].path}> may appear only once")
        return found[0] if found else None

    def text(self) -> str:
        return self.el.text or ""

    def child_text(self, tag: str, *, strip: bool = True) -> str | None:
        node = self.child(tag)
        if node is None:
            return None
        node.finish(leaf=True)
        return node.text().strip() if strip else node.text()

    def finish(self, *, leaf: bool = False) -> None:
        """Refuse any attribute, child element or stray text that was not read."""
        for name in self.el.attrib:
            if name not in self._seen_attrs:
                raise _unsupported(
                    f"unsupported attribute '{_local(name)}' of <{self.path}> in domain XML"
                )
        for i, el in enumerate(self.el):
            if i not in self._seen_children:
                raise _unsupported(
                    f"unsupported element <{self._child_path(_local(el.tag))}> in domain XML"
                )
        if not leaf:
            stray = [self.el.text or ""] + [el.tail or "" for el in self.el]
            if any(s.strip() for s in stray):
                raise _xml_error(f"unexpected text in <{self.path}>")


def _local(tag: str) -> str:
    # ElementTree spells namespaced names '{uri}name'; show them as libvirt users write them.
    return tag.rsplit("}", 1)[-1] + (" (namespaced)" if tag.startswith("{") else "")


def _flag(node: _Node, tag: str) -> bool:
    """An empty marker element such as ``<acpi/>`` or ``<readonly/>``."""
    child = node.child(tag)
    if child is None:
        return False
    child.finish()
    return True


def _yes_no(node: _Node, name: str, values: tuple[str, str], default: bool) -> bool:
    value = node.choice(name, values, values[0] if default else values[1])
    return value == values[0]


def _int(value: str, what: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        raise _xml_error(f"invalid integer '{value[:40]}' for {what}")
    if len(value.strip().lstrip("+-").lstrip("0")) > 40:  # int() refuses 4300+ digits
        raise _xml_error(f"integer '{value.strip()[:20]}...' for {what} is too large")
    return int(value)


def parse_memory(value: str, unit: str | None, what: str) -> int:
    """*value* in *unit* (libvirt's unit names, default KiB) as KiB, rounded up."""
    number = value.strip()
    if not re.fullmatch(r"[0-9]+", number):
        raise _xml_error(f"invalid {what} '{value}': expected a non-negative integer")
    scale = unit_scale(unit or "KiB")
    if scale is None:
        raise _xml_error(f"unknown unit '{unit}' for {what} (use b, KB, KiB, MB, MiB, ...)")
    if len(number.lstrip("0")) > 40:  # int() refuses 4300+ digits; far beyond any limit anyway
        raise _xml_error(f"{what} '{number[:20]}...' is too large")
    kib = -(-int(number) * scale // 1024)
    if kib <= 0:
        raise _xml_error(f"{what} must be greater than zero")
    if kib > MAX_MEMORY_KIB:
        raise _xml_error(f"{what} of {kib} KiB is too large")
    return kib


def _validate_name(name: str) -> None:
    if not name:
        raise _xml_error("domain name must not be empty")
    if "/" in name:
        raise _xml_error(f"domain name '{name}' must not contain '/'")
    if name.startswith("."):
        raise _xml_error(f"domain name '{name}' must not start with '.'")
    if len(name) > 64:
        raise _xml_error(f"domain name '{name[:64]}...' is longer than 64 characters")
    if not _NAME_RE.fullmatch(name):
        raise _xml_error(
            f"domain name '{name}' may only contain letters, digits and '_', '.', '+', '-'"
        )


def _canonical_uuid(text: str) -> str:
    value = text.strip()
    if not _UUID_RE.fullmatch(value):
        raise _xml_error(f"malformed uuid '{text}'")
    digits = value.replace("-", "").lower()
    # libvirt refuses UUIDs whose digits are all the same (e.g. all zeros).
    if len(set(digits)) == 1:
        raise _xml_error(f"uuid '{text}' is not usable: all its digits are the same")
    return str(uuidlib.UUID(hex=digits))


def _abs_path(value: str | None, what: str) -> str:
    if not value:
        raise _xml_error(f"missing {what}")
    if not value.startswith("/"):
        raise _xml_error(f"{what} '{value}' must be an absolute path")
    if "\0" in value or "\n" in value:
        raise _xml_error(f"{what} contains a control character")
    return value


def _check_qemu_name(value: str, what: str) -> str:
    if not _QEMU_NAME_RE.fullmatch(value):
        raise _xml_error(f"invalid {what} '{value}'")
    return value


# -- parsing -------------------------------------------------------------------------------


def parse_domain_xml(text: str) -> DomainDef:
    """Parse and validate untrusted domain XML.

    :raise VmferryError: `XML_ERROR` for malformed XML or invalid values,
        `CONFIG_UNSUPPORTED` for anything outside vmferry's subset.
    """
    if len(text) > MAX_XML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_XML_BYTES:
        raise _xml_error(f"domain XML is larger than {MAX_XML_BYTES // 1024} KiB")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON allows "\ud800")
        raise _xml_error(f"domain XML is not valid UTF-8 text: {exc.reason}") from None
    try:
        root = SafeET.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden as exc:
        raise _xml_error(f"domain XML must not contain a DTD ({exc})") from None
    except defusedxml.EntitiesForbidden as exc:
        raise _xml_error(f"domain XML must not declare entities ({exc})") from None
    except defusedxml.DefusedXmlException as exc:
        raise _xml_error(f"domain XML refused: {exc}") from None
    except ET.ParseError as exc:
        raise _xml_error(f"malformed domain XML: {exc}") from None
    if root.tag != "domain":
        raise _xml_error(f"unexpected root element <{_local(root.tag)}>, expecting <domain>")
    return _parse_domain(_Node(root, "domain"))


def _parse_domain(root: _Node) -> DomainDef:
    dtype = root.attr("type")
    if dtype is None:
        raise _xml_error("missing attribute 'type' of <domain>")
    if dtype not in model.DOMAIN_TYPES:
        raise _unsupported(f"unsupported domain type '{dtype}' (supported: qemu, kvm)")

    name = root.child_text("name", strip=False)
    if name is None:
        raise _xml_error("missing element <name>")
    _validate_name(name)
    uuid_text = root.child_text("uuid")
    uuid = _canonical_uuid(uuid_text) if uuid_text is not None else str(uuidlib.uuid4())

    title = root.child_text("title", strip=False) or ""
    if "\n" in title:
        raise _xml_error("title must not contain a newline")
    description = root.child_text("description", strip=False) or ""

    memory = _parse_memory_element(root, "memory")
    if memory is None:
        raise _xml_error("missing element <memory>")
    current = _parse_memory_element(root, "currentMemory")
    if current is None:
        current = memory
    if current > memory:
        raise _xml_error(f"current memory ({current} KiB) must not exceed memory ({memory} KiB)")

    vcpus = 1
    vcpu = root.child("vcpu")
    if vcpu is not None:
        vcpu.choice("placement", ("static",), "static")
        vcpu.finish(leaf=True)
        vcpus = _int(vcpu.text(), "<vcpu>")
        if not 1 <= vcpus <= MAX_VCPUS:
            raise _xml_error(f"vcpu count {vcpus} must be between 1 and {MAX_VCPUS}")

    os_node = root.child("os")
    if os_node is None:
        raise _xml_error("missing element <os>")
    os = _parse_os(os_node)

    features = FeaturesDef()
    features_node = root.child("features")
    if features_node is not None:
        features = FeaturesDef(acpi=_flag(features_node, "acpi"), apic=_flag(features_node, "apic"))
        features_node.finish()

    cpu = None
    cpu_node = root.child("cpu")
    if cpu_node is not None:
        cpu = _parse_cpu(cpu_node)

    clock_offset = "utc"
    clock = root.child("clock")
    if clock is not None:
        clock_offset = clock.choice("offset", model.CLOCK_OFFSETS, "utc")
        clock.finish()

    actions = {}
    for event, default in (
        ("on_poweroff", "destroy"),
        ("on_reboot", "restart"),
        ("on_crash", "destroy"),
    ):
        value = root.child_text(event)
        if value is not None and value not in model.LIFECYCLE_ACTIONS:
            raise _unsupported(
                f"unsupported <{event}> action '{value}' "
                f"(supported: {', '.join(model.LIFECYCLE_ACTIONS)})"
            )
        actions[event] = value or default

    devices_node = root.child("devices")
    devices = _parse_devices(devices_node) if devices_node is not None else Devices()
    root.finish()

    return DomainDef(
        type=dtype,
        name=name,
        uuid=uuid,
        title=title,
        description=description,
        memory_kib=memory,
        current_memory_kib=current,
        vcpus=vcpus,
        os=os,
        features=features,
        cpu=cpu,
        clock_offset=clock_offset,
        on_poweroff=actions["on_poweroff"],
        on_reboot=actions["on_reboot"],
        on_crash=actions["on_crash"],
        devices=devices,
    )


def _parse_memory_element(root: _Node, tag: str) -> int | None:
    node = root.child(tag)
    if node is None:
        return None
    unit = node.attr("unit")
    node.finish(leaf=True)
    return parse_memory(node.text(), unit, f"<{tag}>")


def _parse_os(node: _Node) -> OsDef:
    type_node = node.child("type")
    if type_node is None:
        raise _xml_error("missing element <os/type>")
    arch = type_node.attr("arch", "x86_64") or "x86_64"
    if arch != "x86_64":
        raise _unsupported(f"unsupported architecture '{arch}': vmferry runs x86_64 guests only")
    machine = _check_qemu_name(type_node.attr("machine", "pc") or "pc", "machine type")
    type_node.finish(leaf=True)
    os_type = type_node.text().strip()
    if os_type != "hvm":
        raise _unsupported(f"unsupported OS type '{os_type}' (supported: hvm)")

    kernel = node.child_text("kernel", strip=False)
    initrd = node.child_text("initrd", strip=False)
    cmdline = node.child_text("cmdline", strip=False) or ""
    if kernel is not None:
        kernel = _abs_path(kernel, "kernel path")
    if initrd is not None:
        initrd = _abs_path(initrd, "initrd path")
        if kernel is None:
            raise _xml_error("<os/initrd> needs <os/kernel>")
    if cmdline and kernel is None:
        raise _xml_error("<os/cmdline> needs <os/kernel>")

    boot_devs = []
    for boot in node.children("boot"):
        dev = boot.choice("dev", model.BOOT_DEVS)
        boot.finish()
        if dev in boot_devs:
            raise _xml_error(f"boot device '{dev}' listed twice")
        boot_devs.append(dev)
    node.finish()
    return OsDef(
        type=os_type,
        arch=arch,
        machine=machine,
        kernel=kernel or "",
        initrd=initrd or "",
        cmdline=cmdline,
        boot_devs=boot_devs,
    )


def _parse_cpu(node: _Node) -> CpuDef:
    mode = node.choice("mode", model.CPU_MODES, "custom")
    cpu_model = ""
    model_node = node.child("model")
    if model_node is not None:
        model_node.finish(leaf=True)
        cpu_model = _check_qemu_name(model_node.text().strip(), "CPU model")
    node.finish()
    if mode == "custom" and not cpu_model:
        raise _xml_error("<cpu mode='custom'> needs a <model>")
    if mode != "custom" and cpu_model:
        raise _unsupported(f"<cpu/model> is not supported with mode '{mode}'")
    return CpuDef(mode=mode, model=cpu_model)


def _parse_devices(node: _Node) -> Devices:
    emulator = node.child_text("emulator", strip=False)
    if emulator is not None:
        emulator = _abs_path(emulator, "emulator path")

    disks = [_parse_disk(n) for n in node.children("disk")]
    seen_targets: set[str] = set()
    for disk in disks:
        if disk.target_dev in seen_targets:
            raise _xml_error(f"disk target '{disk.target_dev}' is used twice")
        seen_targets.add(disk.target_dev)

    interfaces = [_parse_interface(n) for n in node.children("interface")]
    macs = [nic.mac for nic in interfaces]
    for mac in macs:
        if macs.count(mac) > 1:
            raise _xml_error(f"MAC address {mac} is used twice")

    serials: list[CharDef] = []
    for n in node.children("serial"):
        serial = _parse_char(n, console=False, default_port=len(serials))
        if any(s.target_port == serial.target_port for s in serials):
            raise _xml_error(f"serial port {serial.target_port} is defined twice")
        serials.append(serial)

    consoles = [_parse_char(n, console=True, default_port=0) for n in node.children("console")]
    if len(consoles) > 1:
        raise _unsupported("only one <console> is supported (no virtio consoles)")
    for console in consoles:
        match = next((s for s in serials if s.target_port == console.target_port), None)
        if match is None:
            # libvirt's rule: a serial console without its serial port defines that port.
            serials.append(
                CharDef(
                    console.type,
                    console.path,
                    console.append,
                    console.mode,
                    console.target_port,
                    "isa-serial",
                )
            )
        elif _backend(match) != _backend(console):
            raise _unsupported(
                f"<console> must use the same backend as serial port {match.target_port}"
            )

    graphics = [_parse_graphics(n) for n in node.children("graphics")]
    if len(graphics) > 1:
        raise _unsupported("only one <graphics> device is supported")

    video = None
    video_node = node.child("video")
    if video_node is not None:
        model_node = video_node.child("model")
        if model_node is None:
            raise _xml_error("missing element <devices/video/model>")
        video = model_node.choice("type", model.VIDEO_MODELS)
        model_node.finish()
        video_node.finish()

    memballoon = "virtio"
    balloon = node.child("memballoon")
    if balloon is not None:
        memballoon = balloon.choice("model", model.MEMBALLOON_MODELS)
        balloon.finish()

    node.finish()
    return Devices(
        emulator=emulator,
        disks=disks,
        interfaces=interfaces,
        serials=serials,
        consoles=consoles,
        graphics=graphics,
        video=video,
        memballoon=memballoon,
    )


def _backend(c: CharDef) -> tuple[str, str, bool, str]:
    return (c.type, c.path, c.append, c.mode)


def _storage_name(check: Callable[[object], str], value: str | None) -> str:
    try:
        return check(value)
    except VmferryError as err:
        raise _xml_error(f"disk source: {err.message}") from None


def disk_index(target_dev: str) -> int:
    """The position a target name stands for: ``vda`` is 0, ``hdc`` 2, ``sdaa`` 26."""
    match = _TARGET_DEV_RE.fullmatch(target_dev)
    if match is None:
        raise _xml_error(f"invalid disk target '{target_dev}' (expected vdX, sdX or hdX)")
    index = 0
    for ch in match.group(2):
        index = index * 26 + ord(ch) - ord("a") + 1
    return index - 1


def _parse_disk(node: _Node) -> DiskDef:
    disk_type = node.choice("type", model.DISK_TYPES, "file")
    device = node.choice("device", model.DISK_DEVICES, "disk")

    driver_type, cache = "raw", "default"
    driver = node.child("driver")
    if driver is not None:
        driver.choice("name", ("qemu",), "qemu")
        driver_type = driver.choice("type", model.DISK_FORMATS, "raw")
        cache = driver.choice("cache", model.DISK_CACHES, "default")
        driver.finish()

    source_file = pool = volume = ""
    source = node.child("source")
    if source is not None and disk_type == "volume":
        pool = _storage_name(check_pool_name, source.attr("pool"))
        volume = _storage_name(check_volume_name, source.attr("volume"))
        source.finish()
    elif source is not None:
        source_file = _abs_path(source.attr("file"), "disk source file")
        source.finish()
    if disk_type == "volume" and not volume:
        raise _xml_error("a disk of type 'volume' needs <source pool='...' volume='...'/>")
    if not source_file and not volume and device != "cdrom":
        raise _xml_error("a disk needs <source file='...'/>")

    target = node.child("target")
    if target is None:
        raise _xml_error("missing element <devices/disk/target>")
    target_dev = target.attr("dev") or ""
    disk_index(target_dev)
    bus = target.choice("bus", model.DISK_BUSES, _BUS_BY_PREFIX[target_dev[:2]])
    target.finish()

    readonly = _flag(node, "readonly")
    node.finish()
    if device == "cdrom":
        if bus == "virtio":
            raise _unsupported(f"CD-ROM '{target_dev}' cannot use bus 'virtio' (use sata or ide)")
        readonly = True  # a CD-ROM is read-only whether the XML says so or not
    return DiskDef(
        type=disk_type,
        device=device,
        driver_type=driver_type,
        cache=cache,
        source_file=source_file,
        source_pool=pool,
        source_volume=volume,
        target_dev=target_dev,
        target_bus=bus,
        readonly=readonly,
    )


def _parse_interface(node: _Node) -> InterfaceDef:
    node.choice("type", ("user",))
    mac = ""
    mac_node = node.child("mac")
    if mac_node is not None:
        mac = mac_node.attr("address") or ""
        mac_node.finish()
        if not _MAC_RE.fullmatch(mac):
            raise _xml_error(f"malformed MAC address '{mac}'")
        mac = mac.lower()
        if int(mac[:2], 16) & 1:
            raise _xml_error(f"MAC address '{mac}' is a multicast address")
    nic_model = "virtio"
    model_node = node.child("model")
    if model_node is not None:
        nic_model = model_node.choice("type", model.NIC_MODELS)
        model_node.finish()
    node.finish()
    return InterfaceDef(mac=mac or model.random_mac(), model=nic_model)


def _parse_char(node: _Node, *, console: bool, default_port: int) -> CharDef:
    ctype = node.choice("type", model.CHAR_TYPES)
    path, append, mode = "", False, "bind"
    source = node.child("source")
    if source is not None:
        if ctype == "pty":
            # Only in live XML: the pty QEMU allocated.
            path = _abs_path(source.attr("path"), f"<{source.path}> path")
        elif ctype == "file":
            path = _abs_path(source.attr("path"), f"<{source.path}> path")
            append = _yes_no(source, "append", ("on", "off"), False)
        else:
            path = _abs_path(source.attr("path"), f"<{source.path}> path")
            mode = source.choice("mode", model.CHAR_MODES, "connect")
        source.finish()
    if ctype != "pty" and not path:
        raise _xml_error(f"<{node.path} type='{ctype}'> needs <source path='...'/>")

    target_type = "serial" if console else "isa-serial"
    port = default_port
    target = node.child("target")
    if target is not None:
        target_type = target.choice("type", (target_type,), target_type)
        port_text = target.attr("port")
        if port_text is not None:
            port = _int(port_text, f"<{target.path}> port")
        if not console:
            target_model = target.child("model")
            if target_model is not None:
                target_model.choice("name", ("isa-serial",))
                target_model.finish()
        target.finish()
    if not 0 <= port <= 3:
        raise _unsupported(f"serial port {port} is not supported (0 to 3)")
    node.finish()
    return CharDef(
        type=ctype, path=path, append=append, mode=mode, target_port=port, target_type=target_type
    )


def _parse_graphics(node: _Node) -> GraphicsDef:
    node.choice("type", ("vnc",))
    port = _int(node.attr("port") or "-1", "<devices/graphics> port")
    if port != -1 and not 5900 <= port <= 65535:
        raise _xml_error(f"VNC port {port} must be -1 (automatic) or between 5900 and 65535")
    # As in libvirt, port -1 means autoport whatever the autoport attribute says.
    autoport = _yes_no(node, "autoport", ("yes", "no"), port == -1) or port == -1
    listen = node.attr("listen")
    for listen_node in node.children("listen"):
        listen_node.choice("type", ("address",))
        address = listen_node.attr("address")
        listen_node.finish()
        if address is None:
            raise _xml_error("<devices/graphics/listen> needs an address")
        if listen is not None and address != listen:
            raise _xml_error(f"graphics listen '{listen}' and <listen> '{address}' differ")
        listen = address
    node.finish()
    listen = listen or "127.0.0.1"
    if listen not in model.LOOPBACK_LISTEN:
        raise _unsupported(
            f"VNC may only listen on loopback (127.0.0.1, ::1, localhost), not '{listen}'"
        )
    return GraphicsDef(autoport=autoport, port=port, listen=listen)


# -- formatting ----------------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def format_domain_xml(d: DomainDef, *, migratable: bool = False) -> str:
    """*d* as domain XML, uuid and memory always present (memory in KiB, like libvirt).

    With *migratable*, leave out what only makes sense on this host while the
    domain runs (allocated pty paths, an automatically chosen VNC port), so
    the result can define the domain on a migration's destination.
    """
    root = ET.Element("domain", {"type": d.type})
    _sub(root, "name", d.name)
    _sub(root, "uuid", d.uuid)
    if d.title:
        _sub(root, "title", d.title)
    if d.description:
        _sub(root, "description", d.description)
    _sub(root, "memory", str(d.memory_kib), unit="KiB")
    _sub(root, "currentMemory", str(d.current_memory_kib), unit="KiB")
    _sub(root, "vcpu", str(d.vcpus), placement="static")

    os = _sub(root, "os")
    _sub(os, "type", d.os.type, arch=d.os.arch, machine=d.os.machine)
    if d.os.kernel:
        _sub(os, "kernel", d.os.kernel)
    if d.os.initrd:
        _sub(os, "initrd", d.os.initrd)
    if d.os.cmdline:
        _sub(os, "cmdline", d.os.cmdline)
    for dev in d.os.boot_devs:
        _sub(os, "boot", dev=dev)

    if d.features.acpi or d.features.apic:
        features = _sub(root, "features")
        if d.features.acpi:
            _sub(features, "acpi")
        if d.features.apic:
            _sub(features, "apic")
    if d.cpu is not None:
        cpu = _sub(root, "cpu", mode=d.cpu.mode)
        if d.cpu.model:
            _sub(cpu, "model", d.cpu.model)
    _sub(root, "clock", offset=d.clock_offset)
    _sub(root, "on_poweroff", d.on_poweroff)
    _sub(root, "on_reboot", d.on_reboot)
    _sub(root, "on_crash", d.on_crash)
    _format_devices(_sub(root, "devices"), d.devices, migratable)

    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _format_devices(parent: ET.Element, dev: Devices, migratable: bool) -> None:
    if dev.emulator:
        _sub(parent, "emulator", dev.emulator)
    for disk in dev.disks:
        el = _sub(parent, "disk", type=disk.type, device=disk.device)
        driver = {"name": "qemu", "type": disk.driver_type}
        if disk.cache != "default":
            driver["cache"] = disk.cache
        _sub(el, "driver", **driver)
        if disk.type == "volume":
            _sub(el, "source", pool=disk.source_pool, volume=disk.source_volume)
        elif disk.source_file:
            _sub(el, "source", file=disk.source_file)
        _sub(el, "target", dev=disk.target_dev, bus=disk.target_bus)
        if disk.readonly:
            _sub(el, "readonly")
    for nic in dev.interfaces:
        el = _sub(parent, "interface", type=nic.type)
        _sub(el, "mac", address=nic.mac)
        _sub(el, "model", type=nic.model)
    for serial in dev.serials:
        _format_char(parent, "serial", serial, migratable)
    for console in dev.consoles:
        _format_char(parent, "console", console, migratable)
    for g in dev.graphics:
        attrs = {"type": g.type, "autoport": "yes" if g.autoport else "no", "listen": g.listen}
        attrs["port"] = str(-1 if g.autoport and migratable else g.port)
        el = _sub(parent, "graphics", **attrs)
        _sub(el, "listen", type="address", address=g.listen)
    if dev.video is not None:
        _sub(_sub(parent, "video"), "model", type=dev.video)
    _sub(parent, "memballoon", model=dev.memballoon)


def _format_char(parent: ET.Element, tag: str, c: CharDef, migratable: bool) -> None:
    el = _sub(parent, tag, type=c.type)
    if c.type == "file":
        source = {"path": c.path}
        if c.append:
            source["append"] = "on"
        _sub(el, "source", **source)
    elif c.type == "unix":
        _sub(el, "source", mode=c.mode, path=c.path)
    elif c.path and not migratable:
        _sub(el, "source", path=c.path)
    _sub(el, "target", type=c.target_type, port=str(c.target_port))


# -- migration ABI check -------------------------------------------------------------------


def _abi_items(d: DomainDef) -> Iterator[tuple[str, Any]]:
    """(what, value) pairs that make up the guest-visible ABI, in libvirt's check order."""
    yield "name", d.name
    yield "uuid", d.uuid
    yield "type", d.type
    yield "architecture", d.os.arch
    yield "machine type", d.os.machine
    yield "memory", d.memory_kib
    yield "vCPU count", d.vcpus
    yield "CPU", (d.cpu.mode, d.cpu.model) if d.cpu else None
    yield "ACPI feature", d.features.acpi
    yield "APIC feature", d.features.apic
    yield "clock offset", d.clock_offset
    dev = d.devices
    yield "disk count", len(dev.disks)
    for i, disk in enumerate(dev.disks):
        yield f"disk {i} target", disk.target_dev
        yield f"disk {disk.target_dev} device", disk.device
        yield f"disk {disk.target_dev} bus", disk.target_bus
        yield f"disk {disk.target_dev} read-only", disk.readonly
    yield "interface count", len(dev.interfaces)
    for i, nic in enumerate(dev.interfaces):
        yield f"interface {i} MAC", nic.mac
        yield f"interface {i} model", nic.model
    yield "serial count", len(dev.serials)
    for i, serial in enumerate(dev.serials):
        yield f"serial {i} port", serial.target_port
    yield "console count", len(dev.consoles)
    for i, console in enumerate(dev.consoles):
        yield f"console {i} port", console.target_port
    yield "graphics count", len(dev.graphics)
    yield "video model", dev.video or "none"
    yield "memballoon model", dev.memballoon


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value if v)
    return str(value)


def check_abi_stability(src: DomainDef, dst: DomainDef) -> None:
    """Refuse a destination definition that would change what the guest sees.

    Host-side details (disk source paths and formats, cache modes, title,
    description, char device backends, graphics listen address, emulator) may
    differ; anything the guest can observe may not.

    :raise VmferryError: `CONFIG_UNSUPPORTED` naming the first difference.
    """
    for (what, want), (_, got) in zip(_abi_items(src), _abi_items(dst), strict=False):
        if want != got:
            raise _unsupported(
                f"Target domain {what} '{_show(got)}' does not match source '{_show(want)}'"
            )
