"""This host's side of storage migration: where a copied disk lives, creating and deleting it.

A ``<disk type='volume'>`` is a volume of this host's pool of the same name,
created by the pool (:meth:`vmferry.storage.Pool.create_volume`: same format
and capacity; with ``--copy-storage-inc`` on top of the same backing volume,
which must exist in this pool). A ``<disk type='file'>`` is created only
below a configured root (``[paths] roots``), never over an existing file
(claimed with ``O_EXCL`` first), owned by the QEMU user. Either way an
existing disk is used as it is, and reported as not created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from vmferry.domain.model import DiskDef
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.confine import Confinement
from vmferry.storage import Pools, remember_created

QEMU_IMG = "qemu-img"
#: qemu-img create/info of an image: a few seconds at most on any disk.
QEMU_IMG_TIMEOUT_S = 60.0


def disk_path(pools: Pools | None, disk: DiskDef) -> str:
    if disk.type == "volume":
        return str(_pools(pools).get(disk.source_pool).volume_path(disk.source_volume))
    return disk.source_file


def _pools(pools: Pools | None) -> Pools:
    if pools is None:
        raise VmferryError(ErrorCode.NO_STORAGE_POOL, "this host has no storage pools")
    return pools


async def create_volume(
    pools: Pools | None, disk: DiskDef, capacity: int, backing: str, backing_format: str
) -> bool:
    """Create *disk*'s volume in this host's pool; False when it exists already."""
    pool = _pools(pools).get(disk.source_pool)
    try:
        await asyncio.to_thread(
            pool.create_volume,
            disk.source_volume,
            capacity,
            disk.driver_type,
            (backing, backing_format or "raw") if backing else None,
        )
    except VmferryError as err:
        if err.code == ErrorCode.STORAGE_VOL_EXISTS:
            return False
        raise VmferryError(err.code, f"disk '{disk.target_dev}': {err.message}") from None
    return True


def disk_exists(path: str) -> bool:
    return os.path.lexists(path)


async def _qemu_img(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise VmferryError(
            ErrorCode.OPERATION_FAILED,
            f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()[-300:]}",
        )
    return out.decode(errors="replace")


async def create_disk(
    confine: Confinement | None,
    path: str,
    disk: DiskDef,
    capacity: int,
    *,
    backing: str = "",
    backing_format: str = "",
) -> bool:
    """Create *path* for *disk*; False when it exists already (then it is not ours).

    :raise VmferryError: ``ACCESS_DENIED`` outside the roots (or without confinement,
        which has no roots to check against), ``OPERATION_FAILED`` when qemu-img fails
        (no room, a missing backing file).
    """
    what = f"disk '{disk.target_dev}'"
    if confine is None:
        raise VmferryError(
            ErrorCode.ACCESS_DENIED,
            f"{what}: this daemon creates no disks for storage migration without [paths] roots",
        )
    real = confine.check_new_file(path, what)
    try:
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    except OSError as err:
        raise VmferryError(ErrorCode.OPERATION_FAILED, f"{what}: {path}: {err.strerror}") from err
    os.close(fd)
    args = ["create", "-q", "-f", disk.driver_type]
    if backing and disk.driver_type != "qcow2":
        raise VmferryError(ErrorCode.OPERATION_FAILED, f"{what}: only qcow2 has a backing file")
    if backing:
        base = os.path.join(os.path.dirname(real), os.path.basename(backing))
        if not os.path.exists(base):  # noqa: ASYNC240 - one stat of a local file
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"{what}: --copy-storage-inc needs its backing file {base} on this host",
            )
        # relative: the same directory on each host (a pool's volumes)
        args += ["-b", os.path.basename(backing), "-F", backing_format or "raw"]
    await _qemu_img(*args, real, str(capacity))
    if confine.user is not None:
        os.chown(real, confine.user.uid, confine.user.gid)
    if not backing:  # QEMU's start (next) reads no header of it: nothing else was made
        remember_created(path, disk.driver_type, capacity)
    return True


def delete_disk(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise VmferryError(ErrorCode.OPERATION_FAILED, f"{path}: {err.strerror}") from err
