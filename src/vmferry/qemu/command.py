"""The QEMU command line of a domain (libvirt's ``qemu_command.c``).

:func:`build_argv` turns a :class:`~vmferry.domain.model.DomainDef` into the
argv of ``qemu-system-x86_64``. QEMU starts paused (``-S``) with a QMP
monitor; the daemon finishes setup over QMP and then sends ``cont``.

The argv is a pure function of the definition, so a migration's source and
destination, given the same XML, build the same machine: devices are added
in a fixed order, which is what keeps QEMU's automatic PCI slot assignment
(and so the guest ABI) identical on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmferry.domain.model import CharDef, DiskDef, DomainDef
from vmferry.domain.xml import disk_index
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.confine import PassedFiles

DEFAULT_EMULATOR = "qemu-system-x86_64"
# QEMU's seccomp filter: no obsolete syscalls, no set*id, no fork/exec, no scheduler/affinity.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

_BOOT_LETTERS = {"hd": "c", "cdrom": "d", "network": "n"}
_NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
_VIDEO_DEVICES = {"vga": "VGA", "cirrus": "cirrus-vga", "virtio": "virtio-vga"}
# cache mode -> (cache.direct, cache.no-flush, guest-visible write cache), as libvirt maps them
_CACHE_MODES = {
    "none": (True, False, True),
    "writeback": (False, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
_IDE_UNITS = 4  # PIIX: two buses, master and slave
_SATA_PORTS = 6  # ICH9 AHCI


@dataclass(frozen=True)
class BlockLayer:
    """One image of a disk's chain as the daemon resolved it (top first in a chain)."""

    path: str
    format: str


def format_node(target_dev: str, level: int = 0) -> str:
    """Node name of the format layer of image *level* of a disk (0: the top image)."""
    return f"fmt-{target_dev}" + (f"-b{level}" if level else "")


def protocol_node(target_dev: str, level: int = 0) -> str:
    """Node name of the file (protocol) layer of image *level* of a disk."""
    return f"file-{target_dev}" + (f"-b{level}" if level else "")


def cache_direct(disk: DiskDef) -> bool:
    """Whether the disk's cache mode bypasses the host page cache (``O_DIRECT``)."""
    return _CACHE_MODES.get(disk.cache, (False, False, False))[0]


@dataclass(frozen=True)
class QemuPaths:
    """Host paths a domain's QEMU uses."""

    #: QMP monitor socket; QEMU listens on it.
    qmp_socket: Path
    #: Everything the guest writes to serial port 0.
    console_log: Path


def _esc(value: str | Path) -> str:
    # QEMU's option parser: a literal comma inside a value is written twice.
    return str(value).replace(",", ",,")


def is_q35(machine: str) -> bool:
    """Whether *machine* is a Q35 machine type (built-in AHCI, no IDE)."""
    return machine == "q35" or "-q35-" in machine or machine.startswith("pc-q35")


def check_supported(d: DomainDef) -> None:
    """Refuse definitions that parse but that QEMU cannot run as asked.

    :raise VmferryError: `CONFIG_UNSUPPORTED`.
    """

    def refuse(message: str) -> None:
        raise VmferryError(ErrorCode.CONFIG_UNSUPPORTED, message)

    if d.cpu is not None and d.cpu.mode == "host-passthrough" and d.type != "kvm":
        refuse("CPU mode 'host-passthrough' needs <domain type='kvm'>")
    q35 = is_q35(d.os.machine)
    for disk in d.devices.disks:
        index = disk_index(disk.target_dev)
        if disk.target_bus == "ide":
            if q35:
                refuse(f"disk '{disk.target_dev}': machine '{d.os.machine}' has no IDE bus")
            if index >= _IDE_UNITS:
                refuse(f"disk '{disk.target_dev}': IDE supports hda to hdd only")
        if disk.target_bus == "sata" and index >= _SATA_PORTS:
            refuse(f"disk '{disk.target_dev}': SATA supports sda to sdf only")
        if disk.readonly and disk.device == "disk" and disk.target_bus != "virtio":
            refuse(f"disk '{disk.target_dev}': read-only disks need bus 'virtio'")


def qmp_marker(qmp_socket: Path | str) -> str:
    """A QEMU id naming *qmp_socket*: how a restart finds a QEMU it lost track of."""
    return "vmferry-qmp-" + hashlib.sha256(str(qmp_socket).encode()).hexdigest()[:24]


def build_argv(
    d: DomainDef,
    paths: QemuPaths,
    *,
    incoming: bool = False,
    emulator: str | None = None,
    passed: PassedFiles | None = None,
    sandbox: bool = False,
    chains: Mapping[str, Sequence[BlockLayer]] | None = None,
    trace_events: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line for *d*.

    :param paths: where the QMP socket and the serial console log go.
    :param incoming: start as a migration destination (``-incoming defer``).
    :param emulator: QEMU binary; default ``<devices><emulator>``, else
        ``qemu-system-x86_64`` from ``PATH``.
    :param passed: descriptors the daemon opened for QEMU; used instead of
        the paths of the QMP socket, console log and serial files/sockets.
    :param sandbox: turn on QEMU's seccomp filter (`SANDBOX`).
    :param chains: target dev -> the images of the disk, top first (from
        ``vmferry.storage``): each gets its own nodes and the last one
        ``backing: null``. A ``type='volume'`` disk needs one; a file disk
        without one leaves its backing file to QEMU.
    :param trace_events: QEMU trace event names (or patterns) to turn on, from the
        daemon's config (checked there); QEMU logs them, timestamped, to its log.
    :raise VmferryError: `CONFIG_UNSUPPORTED` (see :func:`check_supported`).
    """
    check_supported(d)
    argv = [emulator or d.devices.emulator or DEFAULT_EMULATOR]
    argv += ["-name", f"guest={d.name},debug-threads=on", "-uuid", d.uuid]
    argv += ["-no-user-config", "-nodefaults", "-display", "none", "-S", "-no-shutdown"]

    machine = _esc(d.os.machine)
    if not d.features.acpi:
        machine += ",acpi=off"
    argv += ["-machine", machine, "-accel", "kvm" if d.type == "kvm" else "tcg"]
    if d.cpu is not None:
        # 'max' is TCG's (and KVM's) closest match to the host that is still migratable.
        cpu = {"host-passthrough": "host", "host-model": "max"}.get(d.cpu.mode, d.cpu.model)
        argv += ["-cpu", cpu]
    argv += ["-m", f"size={d.memory_kib}k", "-smp", str(d.vcpus)]
    argv += ["-rtc", f"base={d.clock_offset}"]
    if d.on_reboot != "restart":
        argv.append("-no-reboot")

    if d.os.kernel:
        argv += ["-kernel", d.os.kernel]
    if d.os.initrd:
        argv += ["-initrd", d.os.initrd]
    if d.os.cmdline:
        argv += ["-append", d.os.cmdline]
    if d.os.boot_devs:
        argv += ["-boot", "order=" + "".join(_BOOT_LETTERS[b] for b in d.os.boot_devs)]

    if sandbox:
        argv += ["-sandbox", SANDBOX]
    if passed is not None:
        for fdset, fd, what in passed.fdsets:
            argv += ["-add-fd", f"fd={fd},set={fdset},opaque={_esc(what)}"]
        monitor = f"fd={passed.qmp_fd}"
    else:
        monitor = f"path={_esc(paths.qmp_socket)}"
    argv += [
        "-chardev",
        f"socket,id=charmonitor,{monitor},server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
    ]
    for serial in d.devices.serials:
        argv += _serial_args(serial, paths.console_log, passed)

    # PCI devices in a fixed order: QEMU assigns slots in the order it creates them.
    if d.devices.video in _VIDEO_DEVICES:
        argv += ["-device", f"{_VIDEO_DEVICES[d.devices.video]},id=video0"]
    if not is_q35(d.os.machine) and any(x.target_bus == "sata" for x in d.devices.disks):
        argv += ["-device", "ahci,id=sata0"]
    for disk in d.devices.disks:
        chain = (chains or {}).get(disk.target_dev)
        argv += _disk_args(disk, q35=is_q35(d.os.machine), chain=chain, passed=passed)
    for i, nic in enumerate(d.devices.interfaces):
        argv += ["-netdev", f"user,id=hostnet{i}"]
        argv += ["-device", f"{_NIC_DEVICES[nic.model]},netdev=hostnet{i},id=net{i},mac={nic.mac}"]
    if d.devices.memballoon == "virtio":
        argv += ["-device", "virtio-balloon-pci,id=balloon0"]

    for g in d.devices.graphics:
        host = f"[{g.listen}]" if ":" in g.listen else g.listen
        if g.autoport:
            # QEMU takes the first free display from 0 up, like libvirt's port allocator.
            argv += ["-vnc", f"{host}:0,to=99"]
        else:
            argv += ["-vnc", f"{host}:{g.port - 5900}"]

    if incoming:
        argv += ["-incoming", "defer"]
    argv += ["-msg", "timestamp=on"]  # also stamps each trace event's line
    for event in trace_events:
        argv += ["-trace", event]
    # The QMP socket may be a passed fd: this names it on the command line all the same.
    argv += ["-chardev", f"null,id={qmp_marker(paths.qmp_socket)}"]
    return argv


def _serial_args(serial: CharDef, console_log: Path, passed: PassedFiles | None) -> list[str]:
    port = serial.target_port
    chardev_id = f"charserial{port}"
    if serial.type == "pty":
        backend = f"pty,id={chardev_id}"
    elif serial.type == "file":
        if passed is not None:
            # The daemon opened (and truncated unless appending) the file: always append.
            backend = f"file,id={chardev_id},path={passed.serial_files[port]},append=on"
        else:
            backend = f"file,id={chardev_id},path={_esc(serial.path)}"
            backend += ",append=on" if serial.append else ""
    elif passed is not None and serial.mode == "bind":
        backend = f"socket,id={chardev_id},fd={passed.serial_sockets[port]},server=on,wait=off"
    else:
        backend = f"socket,id={chardev_id},path={_esc(serial.path)}"
        backend += ",server=on,wait=off" if serial.mode == "bind" else ""
    if port == 0:
        # The daemon shows the console from this log whatever the backend is.
        log = passed.console_log if passed is not None else _esc(console_log)
        backend += f",logfile={log},logappend=on"
    return [
        "-chardev",
        backend,
        "-device",
        f"isa-serial,chardev={chardev_id},id=serial{port},index={port}",
    ]


def disk_device_id(disk: DiskDef, *, q35: bool) -> str:
    """The QEMU device id of *disk* (libvirt's names; query-blockstats reports it)."""
    index = disk_index(disk.target_dev)
    if disk.target_bus == "virtio":
        return f"virtio-disk{index}"
    if disk.target_bus == "ide":
        return f"ide0-{index // 2}-{index % 2}"
    return f"sata0-0-{index}"


def _disk_args(
    disk: DiskDef,
    *,
    q35: bool,
    chain: Sequence[BlockLayer] | None,
    passed: PassedFiles | None,
) -> list[str]:
    index = disk_index(disk.target_dev)
    args: list[str] = []
    props = []
    if disk.type == "volume" and not chain:
        raise VmferryError(
            ErrorCode.CONFIG_UNSUPPORTED,
            f"disk '{disk.target_dev}': volume '{disk.source_volume}' of pool "
            f"'{disk.source_pool}' is not resolved on this host",
        )
    if chain is None and disk.source_file:
        chain = [BlockLayer(disk.source_file, disk.driver_type)]
        explicit = False  # QEMU opens a backing file named in the image itself
    else:
        explicit = True
    if chain:
        cache: dict[str, bool] = {}
        if disk.cache in _CACHE_MODES:
            direct, no_flush, write_cache = _CACHE_MODES[disk.cache]
            cache = {"direct": direct, "no-flush": no_flush}
            props.append(f"write-cache={'on' if write_cache else 'off'}")
        # The top image first on the command line is not possible: a node's backing must exist
        # before it, so the deepest image comes first.
        for level in reversed(range(len(chain))):
            layer = chain[level]
            file_node = protocol_node(disk.target_dev, level)
            filename = layer.path
            auto_read_only = True
            if passed is not None and layer.path in passed.disk_files:
                filename = passed.disk_files[layer.path]
                # one descriptor per image, read-write for the guest's top image: opened so
                # from the start (see confine.DiskFile)
                auto_read_only = level > 0 or disk.readonly
            protocol: dict[str, object] = {
                "driver": "file",
                "filename": filename,
                "node-name": file_node,
                "auto-read-only": auto_read_only,
                "discard": "unmap",
            }
            driver = layer.format if level else disk.driver_type
            fmt: dict[str, object] = {
                "driver": driver,
                "node-name": format_node(disk.target_dev, level),
                "file": file_node,
                "read-only": disk.readonly or level > 0,
            }
            if explicit and driver == "qcow2":  # raw has no backing option
                below = level + 1
                fmt["backing"] = format_node(disk.target_dev, below) if below < len(chain) else None
            if cache:
                protocol["cache"] = fmt["cache"] = cache
            # JSON spares escaping the path for QEMU's option syntax.
            args += ["-blockdev", json.dumps(protocol), "-blockdev", json.dumps(fmt)]
        props.insert(0, f"drive={format_node(disk.target_dev)}")

    dev_id = disk_device_id(disk, q35=q35)
    if disk.target_bus == "virtio":
        driver, where = "virtio-blk-pci", ""
    else:
        driver = "ide-cd" if disk.device == "cdrom" else "ide-hd"
        if disk.target_bus == "ide":
            where = f"bus=ide.{index // 2},unit={index % 2}"
        else:
            where = f"bus={'ide' if q35 else 'sata0'}.{index}"
    device = ",".join(p for p in (driver, where, *props, f"id={dev_id}") if p)
    return [*args, "-device", device]
