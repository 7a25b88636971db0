"""
The vmferry test guest: where it is, how to boot it, and how to read it.

The guest (``guest/init.c``, built by ``make guest``) is a kernel plus a tiny
initramfs whose PID 1 stamps a memory buffer, keeps dirtying and verifying
it, and prints a heartbeat on the serial console::

    VMFERRY-HB boot=<16 hex> seq=<n> dirtied=<pages> verified=<pages> errors=<n> up_ms=<n>

A migration kept the VM running correctly when the destination's console
goes on with the same ``boot`` id, a higher ``seq`` and ``errors=0``; see
:func:`check_continuity`.

With a disk (:class:`GuestDisk`, ``guest_xml(disk=...)``) the guest also stamps
the disk's blocks, re-stamps and reads them back, and the heartbeat goes on
with ``disk_ready=<0|1> disk_written=<n> disk_verified=<n> disk_errors=<n>
disk_ioerrors=<n>`` (:class:`DiskCounters`); :mod:`vmferry.testing.disk`
checks a stopped disk image offline.

An ACPI power button press (``shutdown``) makes the guest print
``VMFERRY-POWEROFF boot=<id>`` and power off; with ``vmferry.ignore_power=1``
in *extra_cmdline* it prints ``VMFERRY-POWER-IGNORED boot=<id>`` and runs on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from vmferry.errors import ErrorCode, VmferryError

__all__ = [
    "DiskCounters",
    "GuestDisk",
    "Heartbeat",
    "check_continuity",
    "count_errors_lines",
    "guest_cmdline",
    "guest_paths",
    "guest_xml",
    "last_heartbeat",
    "parse_heartbeats",
]

#: Environment variable naming a directory that holds ``vmlinuz`` and ``initramfs.cpio.gz``.
GUEST_DIR_ENV = "VMFERRY_GUEST_DIR"

# src/vmferry/testguest.py -> repository root
_REPO_ROOT = Path(__file__).resolve().parents[2]

# Harmless under TCG and they shave boot time: no speculation workarounds to patch in.
_FAST_BOOT_ARGS = "mitigations=off"

_HB_RE = re.compile(
    r"VMFERRY-HB boot=(?P<boot>[0-9a-f]{16}) seq=(?P<seq>\d+) dirtied=(?P<dirtied>\d+)"
    r" verified=(?P<verified>\d+) errors=(?P<errors>\d+) up_ms=(?P<up_ms>\d+)"
    r"(?: disk_ready=(?P<d_ready>[01]) disk_written=(?P<d_written>\d+)"
    r" disk_verified=(?P<d_verified>\d+) disk_errors=(?P<d_errors>\d+)"
    r" disk_ioerrors=(?P<d_ioerrors>\d+))?\s*$"
)
#: The guest's disk block: the unit of stamping, re-stamping and verifying.
DISK_BLOCK = 4096


def guest_dir(root: Path | None = None) -> Path:
    """
    The directory of the built guest (see :func:`guest_paths`), resolved; may not exist.

    QEMU runs as an unprivileged user and reads the kernel itself: the repository's build
    inside a directory others cannot enter (a clone under /root) is served from a
    world-readable copy instead.
    """
    if root is not None:
        return root.resolve()
    env = os.environ.get(GUEST_DIR_ENV)
    if env:
        return Path(env).resolve()
    root = (_REPO_ROOT / "build" / "guest").resolve()
    if (root / "vmlinuz").is_file() and not _others_can_read(root / "vmlinuz"):
        return _readable_copy(root)
    return root


def _others_can_read(path: Path) -> bool:
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


def _readable_copy(root: Path) -> Path:
    """A copy of *root*'s guest files in /var/tmp that any user can read (refreshed if stale)."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    copy = Path("/var/tmp") / f"vmferry-guest-{digest}"
    copy.mkdir(mode=0o755, exist_ok=True)
    copy.chmod(0o755)
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        src, dst = root / name, copy / name
        if not src.is_file():
            continue
        if (
            dst.is_file()
            and dst.stat().st_size == src.stat().st_size
            and (dst.stat().st_mtime >= src.stat().st_mtime)
        ):
            continue
        tmp = copy / f".{name}.{os.getpid()}"
        shutil.copyfile(src, tmp)
        tmp.chmod(0o644)
        tmp.replace(dst)
    return copy


def daemon_paths_toml(root: Path | None = None, extra_roots: Sequence[Path] = ()) -> str:
    """
    The ``[paths]`` section a daemon running the test guest needs: its directory as a root,
    and *extra_roots* (e.g. where the test's disk images are).
    """
    roots = ", ".join(json.dumps(str(p)) for p in (guest_dir(root), *extra_roots))
    return f"[paths]\nroots = [{roots}]\n"


def guest_paths(root: Path | None = None) -> tuple[Path, Path]:
    """
    Locate the built guest.

    :param root: Directory holding the artefacts. Default: ``$VMFERRY_GUEST_DIR``
        if set, else ``<repo>/build/guest``.
    :return: ``(vmlinuz, initramfs)`` as absolute paths.
    :raise VmferryError: ``OPERATION_FAILED`` when either file is missing.
    """
    root = guest_dir(root)
    kernel = root / "vmlinuz"
    initrd = root / "initramfs.cpio.gz"
    missing = [p.name for p in (kernel, initrd) if not p.is_file()]
    if missing:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"test guest not built: {', '.join(missing)} missing in {root}; "
            f"run `make guest` in {_REPO_ROOT}",
        )
    return kernel, initrd


_DISK_TARGET_RE = re.compile(r"^vd[a-z]$")
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class GuestDisk:
    """
    A disk the test guest stamps and verifies: its ``<disk>`` element and the writer's settings.

    Exactly one of *file* (``type='file'``, an absolute path) and *pool* + *volume*
    (``type='volume'``, resolved in the host's pool) names the source.
    """

    file: str | None = None
    pool: str | None = None
    volume: str | None = None
    #: ``raw`` or ``qcow2``.
    format: str = "raw"
    #: A virtio target (``vda``..``vdz``): the guest writes ``/dev/<target>``.
    target: str = "vda"
    #: Blocks of :data:`DISK_BLOCK` bytes the guest uses (None: the whole disk).
    blocks: int | None = None
    #: Re-stamp rate in MiB/s (0: stamp once, then only verify).
    mib_s: float = 1.0
    #: Read-back (verification) rate in MiB/s.
    verify_mib_s: float = 4.0
    #: True: the host stamped every block with generation 1
    #: (:func:`vmferry.testing.disk.stamp_image`) and the guest starts verifying at once;
    #: False: the guest stamps them at boot.
    host_init: bool = False
    #: ``<driver cache=...>`` (None: the daemon's default).
    cache: str | None = None

    def __post_init__(self) -> None:
        by_file = self.file is not None
        by_volume = self.pool is not None or self.volume is not None
        if by_file == by_volume or (by_volume and not (self.pool and self.volume)):
            raise VmferryError(
                ErrorCode.INVALID_ARG, "a guest disk needs either file= or both pool= and volume="
            )
        if self.file is not None and not os.path.isabs(self.file):
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"guest disk file {self.file!r} is not absolute"
            )
        for name in (self.pool, self.volume):
            if name is not None and not _VOLUME_NAME_RE.match(name):
                raise VmferryError(ErrorCode.INVALID_ARG, f"bad pool or volume name {name!r}")
        if self.format not in ("raw", "qcow2") or not _DISK_TARGET_RE.match(self.target):
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"guest disk needs format raw|qcow2 and a target vda..vdz "
                f"(got {self.format!r}, {self.target!r})",
            )
        if (self.blocks is not None and self.blocks < 1) or self.mib_s < 0 or self.verify_mib_s < 0:
            raise VmferryError(
                ErrorCode.INVALID_ARG, "guest disk needs blocks >= 1, mib_s >= 0, verify_mib_s >= 0"
            )

    def cmdline(self) -> str:
        """The guest's kernel command line options for this disk."""
        args = [
            f"vmferry.disk=/dev/{self.target}",
            f"vmferry.disk_mib_s={self.mib_s:g}",
            f"vmferry.disk_verify_mib_s={self.verify_mib_s:g}",
        ]
        if self.blocks is not None:
            args.append(f"vmferry.disk_blocks={self.blocks}")
        if self.host_init:
            args.append("vmferry.disk_init=host")
        return " ".join(args)

    def xml(self) -> str:
        """The ``<disk>`` element (virtio bus)."""
        cache = f" cache='{escape(self.cache)}'" if self.cache else ""
        if self.file is not None:
            kind, source = "file", f"<source file='{escape(self.file)}'/>"
        else:
            kind, pool, vol = "volume", escape(str(self.pool)), escape(str(self.volume))
            source = f"<source pool='{pool}' volume='{vol}'/>"
        return (
            f"    <disk type='{kind}' device='disk'>"
            f"<driver name='qemu' type='{self.format}'{cache}/>{source}"
            f"<target dev='{self.target}' bus='virtio'/></disk>\n"
        )


def guest_cmdline(
    *,
    stamp_mib: int = 32,
    dirty_mib_s: float = 4,
    hb_ms: int = 500,
    extra_cmdline: str = "",
    disk: GuestDisk | None = None,
) -> str:
    """
    The kernel command line that boots the guest with these settings.

    :param stamp_mib: Size of the stamped buffer in MiB.
    :param dirty_mib_s: Re-stamp rate in MiB/s (0: the guest only reads).
    :param hb_ms: Heartbeat period in milliseconds.
    :param extra_cmdline: Appended as is, e.g. ``"vmferry.corrupt_after=3"`` or
        ``"vmferry.ignore_power=1"``.
    :param disk: The disk the guest stamps and verifies (None: no disk writer).
    """
    if stamp_mib < 1 or dirty_mib_s < 0 or hb_ms < 1:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            "guest needs stamp_mib >= 1, dirty_mib_s >= 0 and hb_ms >= 1",
        )
    args = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        _FAST_BOOT_ARGS,
        f"vmferry.stamp_mib={stamp_mib}",
        f"vmferry.dirty_mib_s={dirty_mib_s:g}",
        f"vmferry.hb_ms={hb_ms}",
    ]
    if disk is not None:
        args.append(disk.cmdline())
    if extra_cmdline.strip():
        args.append(extra_cmdline.strip())
    return " ".join(args)


def guest_xml(
    name: str,
    *,
    memory_mib: int = 128,
    stamp_mib: int = 32,
    dirty_mib_s: float = 4,
    hb_ms: int = 500,
    vcpus: int = 1,
    uuid: str | None = None,
    extra_cmdline: str = "",
    disk: GuestDisk | None = None,
) -> str:
    """
    Libvirt-style domain XML that boots the test guest.

    Only the subset of the format that vmferry's domain parser supports is
    used. Kernel and initrd paths come from :func:`guest_paths`, so the guest
    must be built. With *disk*, the guest gets that virtio disk and writes it.

    :raise VmferryError: ``OPERATION_FAILED`` when the guest is not built,
        ``INVALID_ARG`` on nonsensical sizes.
    """
    # The kernel and page tables take ~60 MiB; the guest refuses a buffer that does not fit.
    need = stamp_mib * 9 // 8 + 64
    if memory_mib < need or vcpus < 1:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"guest with stamp_mib={stamp_mib} needs memory_mib >= {need} "
            f"(got {memory_mib}) and vcpus >= 1",
        )
    kernel, initrd = guest_paths()
    cmdline = guest_cmdline(
        stamp_mib=stamp_mib,
        dirty_mib_s=dirty_mib_s,
        hb_ms=hb_ms,
        extra_cmdline=extra_cmdline,
        disk=disk,
    )
    uuid_line = f"  <uuid>{escape(uuid)}</uuid>\n" if uuid is not None else ""
    return (
        "<domain type='qemu'>\n"
        f"  <name>{escape(name)}</name>\n"
        f"{uuid_line}"
        f"  <memory unit='MiB'>{memory_mib}</memory>\n"
        f"  <vcpu>{vcpus}</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        f"    <kernel>{escape(str(kernel))}</kernel>\n"
        f"    <initrd>{escape(str(initrd))}</initrd>\n"
        f"    <cmdline>{escape(cmdline)}</cmdline>\n"
        "  </os>\n"
        "  <features><acpi/><apic/></features>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        f"{disk.xml() if disk is not None else ''}"
        "    <serial type='pty'><target port='0'/></serial>\n"
        "    <console type='pty'><target type='serial' port='0'/></console>\n"
        "    <video><model type='none'/></video>\n"
        "    <memballoon model='none'/>\n"
        "  </devices>\n"
        "</domain>\n"
    )


@dataclass(frozen=True)
class DiskCounters:
    """The disk writer's part of a heartbeat."""

    #: The first stamping of every block is done.
    ready: bool
    #: Blocks re-stamped after it.
    written: int
    #: Blocks read back and checked.
    verified: int
    #: Blocks read back with the wrong content (each is repaired, so this counts events).
    errors: int
    #: Failed reads or writes, or a disk the guest could not set up (see VMFERRY-DISK-FATAL).
    ioerrors: int


@dataclass(frozen=True)
class Heartbeat:
    """One ``VMFERRY-HB`` line of the guest."""

    #: Random per boot, 16 hex digits; survives migration, changes on reboot.
    boot: str
    #: 1 for the first heartbeat of a boot, then +1 per heartbeat.
    seq: int
    #: Pages re-stamped since the buffer was ready.
    dirtied: int
    #: Pages checked since the buffer was ready.
    verified: int
    #: Pages found with the wrong content (each is repaired, so this counts events).
    errors: int
    #: Guest CLOCK_MONOTONIC in ms, i.e. time since the guest kernel started.
    up_ms: int
    #: The disk writer's counters; None when the guest has no disk to write.
    disk: DiskCounters | None = None


def _complete_lines(text: str) -> list[str]:
    # A line without its newline may still be growing ("up_ms=17" of "up_ms=1742"): skip it.
    return text.split("\n")[:-1]


def _disk_counters(m: re.Match[str]) -> DiskCounters | None:
    if m["d_ready"] is None:
        return None
    return DiskCounters(
        ready=m["d_ready"] == "1",
        written=int(m["d_written"]),
        verified=int(m["d_verified"]),
        errors=int(m["d_errors"]),
        ioerrors=int(m["d_ioerrors"]),
    )


def parse_heartbeats(text: str) -> list[Heartbeat]:
    """
    All heartbeats in console output, oldest first.

    Other lines are ignored, ``\\r\\n`` is accepted, and a last line without
    its newline is ignored because it may be torn.
    """
    beats: list[Heartbeat] = []
    for line in _complete_lines(text):
        m = _HB_RE.search(line)
        if m is None:
            continue
        beats.append(
            Heartbeat(
                boot=m["boot"],
                seq=int(m["seq"]),
                dirtied=int(m["dirtied"]),
                verified=int(m["verified"]),
                errors=int(m["errors"]),
                up_ms=int(m["up_ms"]),
                disk=_disk_counters(m),
            )
        )
    return beats


def last_heartbeat(text: str) -> Heartbeat | None:
    """The newest complete heartbeat in *text*, or None."""
    beats = parse_heartbeats(text)
    return beats[-1] if beats else None


def count_errors_lines(text: str) -> int:
    """
    Number of ``VMFERRY-ERR`` lines in *text*.

    A torn last line counts too: even a fragment means the guest saw a bad page.
    (The guest rate-limits these lines; :attr:`Heartbeat.errors` is the exact count.)
    """
    return sum(1 for line in text.split("\n") if "VMFERRY-ERR" in line)


def check_continuity(before: Heartbeat, after: Heartbeat) -> None:
    """
    Assert that *after* comes from the same, still healthy run as *before*.

    :raise AssertionError: when the boot id changed (the guest rebooted or a
        different guest answered), the sequence did not advance (the guest
        stopped running), or the guest counted memory errors, or disk errors
        (wrong content read back, failed I/O) when it writes a disk.
    """
    if after.boot != before.boot:
        raise AssertionError(
            f"guest boot id changed from {before.boot} to {after.boot}: "
            "the guest rebooted or this is not the same guest"
        )
    if after.seq <= before.seq:
        raise AssertionError(
            f"guest heartbeat did not advance (seq {before.seq} -> {after.seq}): "
            "the guest is not running"
        )
    if after.errors != 0:
        raise AssertionError(
            f"guest found {after.errors} page(s) with wrong content "
            f"(seq {after.seq}, boot {after.boot}): memory was corrupted"
        )
    if after.disk is not None and (after.disk.errors or after.disk.ioerrors):
        raise AssertionError(
            f"guest disk writer found {after.disk.errors} block(s) with wrong content and "
            f"{after.disk.ioerrors} I/O error(s) (seq {after.seq}, boot {after.boot}): "
            "the disk was corrupted (see VMFERRY-DISK-* lines on the console)"
        )
