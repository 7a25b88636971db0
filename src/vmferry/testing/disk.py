"""
The test guest's disk, seen from the host: images for it, and checks of what it wrote.

The guest (``guest/init.c``, ``vmferry.disk=``) stamps every 4 KiB block of
its disk so that the block describes itself::

    word 0   magic "VMFDISK1"
    word 1   block index
    word 2   generation (1 = first stamp, +1 per re-stamp)
    word 3   ~(index ^ generation)
    word k   disk_seed(index, generation) ^ disk_key[k], k = 4..511

so a disk image can be checked once the guest is stopped, without knowing
which generation each block reached (:func:`verify_disk_image`): that is how
a test checks the destination's copy after a storage migration, besides
:func:`qemu_img_compare` against the source's final content.

- :func:`make_image_dir`: a directory QEMU's user can reach (a daemon root).
- :func:`create_image`: an empty raw/qcow2 image, or one the host stamped
  (:func:`stamp_image`, for ``GuestDisk(host_init=True)``: the guest then
  starts verifying at once instead of writing every block first).
- :func:`wait_disk_ready`: the first heartbeat whose disk writer is ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmferry.client import Client
from vmferry.errors import ErrorCode, VmferryError
from vmferry.testguest import DISK_BLOCK, Heartbeat
from vmferry.testing.heartbeat import wait_heartbeat

__all__ = [
    "DISK_BLOCK",
    "DiskImageReport",
    "ImageCompare",
    "block_bytes",
    "block_generation",
    "check_no_lost_writes",
    "create_image",
    "make_image_dir",
    "qemu_img_compare",
    "stamp_image",
    "verify_disk_image",
    "wait_disk_ready",
]

_MASK = (1 << 64) - 1
_WORDS = DISK_BLOCK // 8
_HDR = 4 * 8  # header bytes
MAGIC = 0x314B534944464D56  # "VMFDISK1" little endian
_ZERO = bytes(DISK_BLOCK)
#: The QEMU user of a default daemon config (``[qemu] user``).
QEMU_USER = "vmferry-qemu"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _seed(index: int, gen: int) -> int:
    return _splitmix64(_splitmix64(index ^ 0xD15CD15CD15CD15C) ^ gen)


# Words 4..511 of a block are seed ^ key[k]: as one big integer, seed * REP ^ KEY, which
# Python computes in one multiplication instead of 508 word operations.
_KEY = b"".join(_splitmix64(0x6469736B + k).to_bytes(8, "little") for k in range(4, _WORDS))
_KEY_INT = int.from_bytes(_KEY, "little")
_REP = sum(1 << (64 * k) for k in range(_WORDS - 4))
_BODY = DISK_BLOCK - _HDR


def _body(index: int, gen: int) -> bytes:
    return ((_seed(index, gen) * _REP) ^ _KEY_INT).to_bytes(_BODY, "little")


def block_bytes(index: int, gen: int) -> bytes:
    """The 4 KiB the guest writes to block *index* at generation *gen*."""
    if index < 0 or gen < 1:
        raise ValueError("block index must be >= 0 and generation >= 1")
    header = b"".join(w.to_bytes(8, "little") for w in (MAGIC, index, gen, ~(index ^ gen) & _MASK))
    return header + _body(index, gen)


def block_generation(data: bytes, index: int) -> int | None:
    """The generation a well-formed block *index* holds, or None (garbage, wrong place, torn)."""
    if len(data) != DISK_BLOCK:
        return None
    magic, idx, gen, check = (int.from_bytes(data[o : o + 8], "little") for o in range(0, _HDR, 8))
    if magic != MAGIC or idx != index or check != ~(idx ^ gen) & _MASK or gen < 1:
        return None
    return gen if data[_HDR:] == _body(index, gen) else None


@dataclass
class DiskImageReport:
    """What :func:`verify_disk_image` found."""

    #: Blocks looked at.
    blocks: int
    #: Well-formed stamped blocks.
    stamped: int = 0
    #: All-zero blocks (never written).
    unstamped: int = 0
    #: Highest generation seen (0: none).
    max_gen: int = 0
    #: ``(block, what is wrong)`` of every bad block (the first 100).
    bad: list[tuple[int, str]] = field(default_factory=list)
    #: Number of bad blocks (may exceed ``len(bad)``).
    bad_count: int = 0
    #: Per block, the generation found (0: unstamped, -1: bad).
    generations: list[int] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.bad_count == 0

    def check(self, *, all_stamped: bool = True) -> None:
        """:raise AssertionError: on a bad block, or (*all_stamped*) a block never stamped."""
        if self.bad_count:
            shown = ", ".join(f"block {i}: {why}" for i, why in self.bad[:5])
            raise AssertionError(
                f"{self.bad_count} of {self.blocks} disk block(s) are not what the guest wrote "
                f"({shown})"
            )
        if all_stamped and self.unstamped:
            raise AssertionError(
                f"{self.unstamped} of {self.blocks} disk block(s) were never stamped"
            )


def _why(data: bytes, index: int) -> str:
    magic, idx, gen = (int.from_bytes(data[o : o + 8], "little") for o in (0, 8, 16))
    if magic != MAGIC:
        return "no stamp (garbage or foreign data)"
    if idx != index:
        return f"holds block {idx}'s stamp (misplaced write)"
    return f"generation {gen} torn or corrupted"


def _raw_view(image: Path, fmt: str | None, nbytes: int, tmp: Path) -> Path:
    """*image* as a raw file of its first *nbytes* (a qcow2 is converted, a raw used as is)."""
    fmt = fmt or image_format(image)
    if fmt == "raw":
        return image
    out = tmp / "view.raw"
    _qemu_img(
        "dd", "-U", "-f", fmt, "-O", "raw", f"bs={DISK_BLOCK}",
        f"count={nbytes // DISK_BLOCK}", f"if={image}", f"of={out}",
    )  # fmt: skip
    return out


def verify_disk_image(
    image: str | Path, *, blocks: int | None = None, fmt: str | None = None
) -> DiskImageReport:
    """
    Check a disk image the test guest stamped: every block is its own, well-formed stamp.

    The guest should be stopped (or paused): a block being written may be torn.

    :param blocks: Blocks to check (default: the whole virtual disk).
    :param fmt: ``raw`` or ``qcow2`` (default: what ``qemu-img info`` says).
    """
    image = Path(image)
    size = image_virtual_size(image, fmt)
    count = size // DISK_BLOCK if blocks is None else blocks
    if count * DISK_BLOCK > size:
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"{image} holds {size // DISK_BLOCK} blocks, not {count}"
        )
    report = DiskImageReport(blocks=count)
    with tempfile.TemporaryDirectory(prefix="vfdisk") as tmp:
        raw = _raw_view(image, fmt, count * DISK_BLOCK, Path(tmp))
        with raw.open("rb") as f:
            for i in range(count):
                data = f.read(DISK_BLOCK)
                if data == _ZERO:
                    report.unstamped += 1
                    report.generations.append(0)
                    continue
                gen = block_generation(data, i)
                report.generations.append(-1 if gen is None else gen)
                if gen is None:
                    report.bad_count += 1
                    if len(report.bad) < 100:
                        report.bad.append((i, _why(data.ljust(DISK_BLOCK, b"\0"), i)))
                    continue
                report.stamped += 1
                report.max_gen = max(report.max_gen, gen)
    return report


def check_no_lost_writes(before: DiskImageReport, after: DiskImageReport) -> None:
    """
    *after* (e.g. the destination's image, the guest still writing there after the hop) holds
    every block at least at the generation *before* (the source's image as it stopped) had.

    The guest only ever raises a block's generation, so an older one means a write that was
    acknowledged on the source never reached the copy.

    :raise AssertionError: naming the first blocks that went back.
    """
    if before.blocks != after.blocks:
        raise AssertionError(f"images of {before.blocks} and {after.blocks} blocks compared")
    pairs = zip(before.generations, after.generations, strict=True)
    older = [(i, a, b) for i, (a, b) in enumerate(pairs) if b < a]
    if older:
        shown = ", ".join(f"block {i}: generation {a} -> {b}" for i, a, b in older[:5])
        raise AssertionError(f"{len(older)} block(s) went back to an older generation ({shown})")


@dataclass(frozen=True)
class ImageCompare:
    """What ``qemu-img compare`` said."""

    identical: bool
    output: str


def qemu_img_compare(
    a: str | Path, b: str | Path, *, fmt_a: str | None = None, fmt_b: str | None = None
) -> ImageCompare:
    """
    ``qemu-img compare``: do *a* and *b* hold the same guest-visible content?

    Formats may differ (a raw copy of a qcow2 compares equal); a size difference
    counts as different unless the extra part is all zeros (qemu-img's rule).

    :raise VmferryError: ``OPERATION_FAILED`` when qemu-img cannot open one of them.
    """
    args = ["compare", "-U"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    proc = subprocess.run(
        ["qemu-img", *args, str(a), str(b)], capture_output=True, text=True, check=False
    )
    if proc.returncode not in (0, 1):
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"qemu-img compare {a} {b} failed: {(proc.stderr or proc.stdout).strip()}",
        )
    return ImageCompare(identical=proc.returncode == 0, output=(proc.stdout + proc.stderr).strip())


def _qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"qemu-img {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}",
        )
    return proc.stdout


def _info(image: Path, fmt: str | None) -> dict[str, object]:
    args = ["info", "-U", "--output=json", *(["-f", fmt] if fmt else []), str(image)]
    info = json.loads(_qemu_img(*args))
    if not isinstance(info, dict):
        raise VmferryError(ErrorCode.OPERATION_FAILED, f"qemu-img info {image}: unexpected output")
    return info


def image_format(image: str | Path) -> str:
    """``raw`` or ``qcow2``, as ``qemu-img info`` detects it."""
    return str(_info(Path(image), None)["format"])


def image_virtual_size(image: str | Path, fmt: str | None = None) -> int:
    """The guest-visible size of *image* in bytes."""
    size = _info(Path(image), fmt)["virtual-size"]
    if not isinstance(size, int):
        raise VmferryError(ErrorCode.OPERATION_FAILED, f"qemu-img info {image}: no size")
    return size


def _give_to_qemu(path: Path) -> None:
    """Let QEMU's user read and write *path* (its owner when we are root and the user exists)."""
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(QEMU_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(path, 0o600)
            return
    os.chmod(path, 0o666)


def make_image_dir(parent: str | Path = "/tmp", prefix: str = "vfimg") -> Path:
    """A new directory QEMU's user can enter, for disk images (add it to the daemon's roots)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    d.chmod(0o755)
    return d


def stamp_image(path: str | Path, blocks: int) -> None:
    """Write blocks ``0..blocks-1`` of the raw file *path* at generation 1, as the guest would."""
    with open(path, "r+b") as f:
        for i in range(blocks):
            f.write(block_bytes(i, 1))


def create_image(path: str | Path, size: int, *, fmt: str = "raw", stamp_blocks: int = 0) -> Path:
    """
    A *size*-byte raw or qcow2 image QEMU's user may write, optionally host-stamped.

    :param stamp_blocks: Stamp the first this many blocks at generation 1
        (for ``GuestDisk(host_init=True, blocks=stamp_blocks)``).
    """
    path = Path(path)
    if fmt not in ("raw", "qcow2") or size % DISK_BLOCK or stamp_blocks * DISK_BLOCK > size:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            f"image needs format raw|qcow2, a size in whole {DISK_BLOCK}-byte blocks and at most "
            f"{size // DISK_BLOCK} stamped blocks",
        )
    raw = path if fmt == "raw" else path.with_name(f".{path.name}.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    if stamp_blocks:
        stamp_image(raw, stamp_blocks)
    if fmt == "qcow2":
        try:
            _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
        finally:
            raw.unlink(missing_ok=True)
    _give_to_qemu(path)
    return path


def wait_disk_ready(
    client: Client, name: str, *, after: Heartbeat | None = None, timeout: float = 240.0
) -> Heartbeat:
    """
    The guest's first heartbeat (past *after*) whose disk writer has stamped every block.

    The *timeout* is a deadline: a boot plus the first stamping pass take a few seconds on a
    quiet machine, minutes at load 25.

    :raise AssertionError: on a timeout, or when the writer reports I/O errors first
        (it could not open or size its disk: see VMFERRY-DISK-FATAL on the console).
    """
    deadline = time.monotonic() + timeout
    hb = after
    while True:
        hb = wait_heartbeat(client, name, after=hb, timeout=max(deadline - time.monotonic(), 0.5))
        if hb.disk is None:
            raise AssertionError(f"{name} has no disk writer (no vmferry.disk= on its cmdline)")
        if hb.disk.ioerrors:
            raise AssertionError(
                f"{name}'s disk writer failed ({hb.disk.ioerrors} I/O errors); console:\n"
                + client.console(name).data[-2000:]
            )
        if hb.disk.ready:
            return hb
