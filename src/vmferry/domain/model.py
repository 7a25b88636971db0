"""The domain definition: the supported subset of libvirt's domain XML as dataclasses.

This is libvirt's ``virDomainDef`` cut down to what vmferry runs. It carries no
QEMU knowledge; :mod:`vmferry.domain.xml` reads and writes it, and
:mod:`vmferry.qemu.command` turns it into a QEMU command line.

All sizes are KiB. Optional strings use ``""`` (or ``None`` where "absent" and
"empty" differ) so two definitions compare equal exactly when their XML means
the same thing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

#: libvirt's (and QEMU's) locally administered OUI for generated MACs.
MAC_PREFIX = "52:54:00"

DOMAIN_TYPES = ("qemu", "kvm")
CPU_MODES = ("host-passthrough", "host-model", "custom")
CLOCK_OFFSETS = ("utc", "localtime")
LIFECYCLE_ACTIONS = ("destroy", "restart", "preserve")
BOOT_DEVS = ("hd", "cdrom", "network")
DISK_TYPES = ("file", "volume")
DISK_DEVICES = ("disk", "cdrom")
DISK_FORMATS = ("raw", "qcow2")
DISK_CACHES = ("default", "none", "writeback", "writethrough", "directsync", "unsafe")
DISK_BUSES = ("virtio", "sata", "ide")
NIC_MODELS = ("virtio", "e1000", "rtl8139")
CHAR_TYPES = ("pty", "file", "unix")
CHAR_MODES = ("bind", "connect")
VIDEO_MODELS = ("none", "vga", "cirrus", "virtio")
MEMBALLOON_MODELS = ("none", "virtio")
LOOPBACK_LISTEN = ("127.0.0.1", "::1", "localhost")


def random_mac() -> str:
    """A MAC address in the ``52:54:00`` range with random low three octets."""
    return MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


@dataclass
class OsDef:
    """``<os>``: firmware type, machine, direct kernel boot and boot order."""

    type: str = "hvm"
    arch: str = "x86_64"
    machine: str = "pc"
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    boot_devs: list[str] = field(default_factory=list)


@dataclass
class FeaturesDef:
    """``<features>``: the flags vmferry knows."""

    acpi: bool = False
    apic: bool = False


@dataclass
class CpuDef:
    """``<cpu mode=...>``; *model* only for ``custom``."""

    mode: str = "custom"
    model: str = ""


@dataclass
class DiskDef:
    """``<disk type='file'>`` (a file) or ``<disk type='volume'>`` (a volume of a pool).

    A volume is named by pool and volume and resolved on each host in that
    host's pool of the name when QEMU starts (:mod:`vmferry.storage`).
    """

    target_dev: str
    source_file: str = ""  # type 'file'; "" only for an empty CD-ROM tray
    device: str = "disk"
    driver_type: str = "raw"
    cache: str = "default"
    target_bus: str = "virtio"
    readonly: bool = False
    type: str = "file"  # DISK_TYPES
    source_pool: str = ""  # type 'volume'
    source_volume: str = ""  # type 'volume'

    @property
    def has_source(self) -> bool:
        """Whether the disk has a medium (a file or a volume)."""
        return bool(self.source_file or self.source_volume)


@dataclass
class InterfaceDef:
    """``<interface type='user'>``: a NIC on QEMU's user-mode network."""

    mac: str = field(default_factory=random_mac)
    model: str = "virtio"
    type: str = "user"


@dataclass
class CharDef:
    """A serial port or console and its host-side backend.

    *path* is the pty QEMU allocated (runtime only) for ``pty``, the file for
    ``file`` and the socket for ``unix``.
    """

    type: str = "pty"
    path: str = ""
    append: bool = False  # file only
    mode: str = "bind"  # unix only
    target_port: int = 0
    target_type: str = "isa-serial"  # "serial" for a console


@dataclass
class GraphicsDef:
    """``<graphics type='vnc'>``; only ever listening on loopback."""

    autoport: bool = True
    port: int = -1  # with autoport: the port QEMU picked while running, else -1
    listen: str = "127.0.0.1"
    type: str = "vnc"


@dataclass
class Devices:
    """``<devices>``."""

    emulator: str | None = None
    disks: list[DiskDef] = field(default_factory=list)
    interfaces: list[InterfaceDef] = field(default_factory=list)
    serials: list[CharDef] = field(default_factory=list)
    consoles: list[CharDef] = field(default_factory=list)
    graphics: list[GraphicsDef] = field(default_factory=list)
    video: str | None = None  # None: no <video> element
    memballoon: str = "virtio"  # libvirt adds a virtio balloon unless told 'none'


@dataclass
class DomainDef:
    """One domain definition (libvirt's ``virDomainDef``)."""

    name: str
    uuid: str
    memory_kib: int
    type: str = "qemu"
    title: str = ""
    description: str = ""
    current_memory_kib: int = 0  # 0: same as memory_kib (normalised by the parser)
    vcpus: int = 1
    os: OsDef = field(default_factory=OsDef)
    features: FeaturesDef = field(default_factory=FeaturesDef)
    cpu: CpuDef | None = None
    clock_offset: str = "utc"
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    devices: Devices = field(default_factory=Devices)

    def __post_init__(self) -> None:
        if not self.current_memory_kib:
            self.current_memory_kib = self.memory_kib
