"""Storage pools and volumes (libvirt's storage driver, the ``dir`` pool subset).

A host has pools (``[pools.NAME] path = ...``; ``default`` under the state
directory when none is configured); a pool's volumes are the plain files of
its directory, raw or qcow2, qcow2 with backing chains inside the pool
(backing files are written as names relative to the pool, so a chain means
the same on every host that has a pool of that name).

``<disk type='volume'><source pool='P' volume='V'/>`` is resolved on each host
in its own pool P when QEMU starts (and so at Prepare on a migration
destination): :meth:`Pools.resolve` walks the chain (``qemu-img info`` layer
by layer, every backing file checked to be a volume of the pool before it is
opened, its format read from the image, never probed), the daemon opens the
files and QEMU gets descriptors (``-add-fd``), so it needs no access to the
pool directory.

Block node names (``vmferry.qemu.command``), stable for block jobs and
storage migration; for the disk with target ``vda``:

- ``fmt-vda`` / ``file-vda``: the format and protocol nodes of the top image
  (the one the guest writes); ``fmt-vda`` is what the device uses and what a
  mirror copies from;
- ``fmt-vda-b1`` / ``file-vda-b1``, ``-b2``, ...: backing images, nearest first;
  the deepest has ``backing: null`` (QEMU opens nothing by itself);
- ``drive-vda``: the name of the NBD export of the disk during storage
  migration (libvirt's ``drive-<alias>`` naming).

Everything here blocks (file system, ``qemu-img``): the daemon calls it in a
thread (``asyncio.to_thread``). ``qemu-img`` is a fixed program; no client
input becomes a path outside a pool or an option.
"""

from vmferry.domain.storage_names import check_pool_name, check_volume_name
from vmferry.storage.pool import (
    VOLUME_FORMATS,
    Layer,
    Pool,
    PoolConfig,
    Upload,
    VolumeInfo,
)
from vmferry.storage.pools import DEFAULT_POOL, Pools, default_pool_path
from vmferry.storage.qemuimg import remember_created


#: The NBD export of a disk during storage migration (libvirt: ``drive-<alias>``).
def nbd_export_name(target_dev: str) -> str:
    return f"drive-{target_dev}"


__all__ = [
    "DEFAULT_POOL",
    "VOLUME_FORMATS",
    "Layer",
    "Pool",
    "PoolConfig",
    "Pools",
    "Upload",
    "VolumeInfo",
    "check_pool_name",
    "check_volume_name",
    "default_pool_path",
    "nbd_export_name",
    "remember_created",
]
