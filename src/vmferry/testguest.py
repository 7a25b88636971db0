"""
The vmferry test guest: where it is, how to boot it, and how to read it.

The guest (``guest/init.c``, built by ``make guest``) is a kernel plus a tiny
initramfs whose PID 1 stamps a memory buffer, keeps dirtying and verifying
it, and prints a heartbeat on the serial console::

    VMFERRY-HB boot=<16 hex> seq=<n> dirtied=<pages> verified=<pages> errors=<n> up_ms=<n>

A migration kept the VM running correctly when the destination's console
goes on with the same ``boot`` id, a higher ``seq`` and ``errors=0``; see
:func:`check_continuity`.

An ACPI power button press (``shutdown``) makes the guest print
``VMFERRY-POWEROFF boot=<id>`` and power off; with ``vmferry.ignore_power=1``
in *extra_cmdline* it prints ``VMFERRY-POWER-IGNORED boot=<id>`` and runs on.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from vmferry.errors import ErrorCode, VmferryError

__all__ = [
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
    r" verified=(?P<verified>\d+) errors=(?P<errors>\d+) up_ms=(?P<up_ms>\d+)\s*$"
)


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


def daemon_paths_toml(root: Path | None = None) -> str:
    """The ``[paths]`` section a daemon running the test guest needs: its directory as a root."""
    return f'[paths]\nroots = ["{guest_dir(root)}"]\n'


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


def guest_cmdline(
    *,
    stamp_mib: int = 32,
    dirty_mib_s: float = 4,
    hb_ms: int = 500,
    extra_cmdline: str = "",
) -> str:
    """
    The kernel command line that boots the guest with these settings.

    :param stamp_mib: Size of the stamped buffer in MiB.
    :param dirty_mib_s: Re-stamp rate in MiB/s (0: the guest only reads).
    :param hb_ms: Heartbeat period in milliseconds.
    :param extra_cmdline: Appended as is, e.g. ``"vmferry.corrupt_after=3"`` or
        ``"vmferry.ignore_power=1"``.
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
) -> str:
    """
    Libvirt-style domain XML that boots the test guest.

    Only the subset of the format that vmferry's domain parser supports is
    used. Kernel and initrd paths come from :func:`guest_paths`, so the guest
    must be built.

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
        stamp_mib=stamp_mib, dirty_mib_s=dirty_mib_s, hb_ms=hb_ms, extra_cmdline=extra_cmdline
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
        "    <serial type='pty'><target port='0'/></serial>\n"
        "    <console type='pty'><target type='serial' port='0'/></console>\n"
        "    <video><model type='none'/></video>\n"
        "    <memballoon model='none'/>\n"
        "  </devices>\n"
        "</domain>\n"
    )


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


def _complete_lines(text: str) -> list[str]:
    # A line without its newline may still be growing ("up_ms=17" of "up_ms=1742"): skip it.
    return text.split("\n")[:-1]


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
        stopped running), or the guest counted memory errors.
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
