"""The storage APIs of the daemon: pools, volumes and what domains use them.

Every pool operation blocks (file system, ``qemu-img``) and runs in a thread;
the checks that need the domains (is a volume in use?) run on the event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

from vmferry.api.storage import BackingVolume, DiskSource, PoolInfo, VolumeCreateRequest
from vmferry.api.storage import VolumeInfo as VolumeBody
from vmferry.daemon.driver import Driver
from vmferry.domain.model import DomainDef
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.domain import QemuDomain
from vmferry.storage import Pool, Pools, VolumeInfo
from vmferry.storage.pool import iter_chunks

#: Bytes per read or write of an upload or download: the most one holds in memory.
CHUNK = 1 << 20


def volume_body(info: VolumeInfo) -> VolumeBody:
    return VolumeBody(
        pool=info.pool,
        name=info.name,
        path=info.path,
        format=info.format,
        capacity=info.capacity,
        allocation=info.allocation,
        backing=[BackingVolume(name=n, format=f) for n, f in info.backing],
    )


class StorageService:
    """``pool-list``, ``vol-*`` and ``domblklist`` of one daemon."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    @property
    def pools(self) -> Pools:
        if self.driver.pools is None:
            raise VmferryError(ErrorCode.NO_SUPPORT, "this daemon has no storage pools")
        return self.driver.pools

    def pool(self, name: str) -> Pool:
        return self.pools.get(name)

    async def list_pools(self) -> list[PoolInfo]:
        def info(pool: Pool) -> PoolInfo:
            st = os.statvfs(pool.path)
            count = sum(1 for _ in _volume_names(pool))
            return PoolInfo(
                name=pool.name,
                path=str(pool.path),
                capacity=st.f_blocks * st.f_frsize,
                available=st.f_bavail * st.f_frsize,
                volumes=count,
            )

        return [await asyncio.to_thread(info, pool) for pool in self.pools]

    async def list_volumes(self, pool: str) -> list[VolumeBody]:
        found = await asyncio.to_thread(self.pool(pool).list)
        return [volume_body(v) for v in found]

    async def info(self, pool: str, name: str) -> VolumeBody:
        return volume_body(await asyncio.to_thread(self.pool(pool).info, name))

    async def create(self, pool: str, req: VolumeCreateRequest) -> VolumeBody:
        backing = None
        if req.backing_vol is not None:
            backing = (req.backing_vol, req.backing_format or "qcow2")
        elif req.backing_format is not None:
            raise VmferryError(ErrorCode.INVALID_ARG, "a backing format needs a backing volume")
        p = self.pool(pool)
        info = await asyncio.to_thread(p.create_volume, req.name, req.capacity, req.format, backing)
        return volume_body(info)

    async def delete(self, pool: str, name: str) -> None:
        p = self.pool(pool)
        p.volume_path(name)  # a bad name fails before the domains are looked at
        users = await self._users(p, name, defined=True)
        if users:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"volume '{name}' of pool '{pool}' is in use by domain "
                f"'{users[0]}' (undefine the domain or change its disk first)",
            )
        await asyncio.to_thread(p.delete_volume, name)

    async def _users(self, pool: Pool, name: str, *, defined: bool) -> list[str]:
        """Domains whose disks open volume *name* (directly or as a backing file).

        *defined*: every domain this daemon knows (running or not); else only running ones.
        """
        users = []
        for dom in self.driver.domains():
            if not defined and not dom.active:
                continue
            for d in _definitions(dom):
                if await asyncio.to_thread(_opens, pool, d, name):
                    users.append(dom.name)
                    break
        return users

    async def upload(self, pool: str, name: str, body: AsyncIterator[bytes]) -> VolumeBody:
        """Replace volume *name*'s content with *body*, at most its capacity."""
        p = self.pool(pool)
        p.volume_path(name)
        users = await self._users(p, name, defined=False)
        if users:
            raise VmferryError(
                ErrorCode.OPERATION_INVALID,
                f"volume '{name}' of pool '{pool}' is in use by running domain '{users[0]}'",
            )
        up = await asyncio.to_thread(p.begin_upload, name)
        try:
            buffer = bytearray()
            async for chunk in body:
                buffer += chunk
                if len(buffer) >= CHUNK:
                    await asyncio.to_thread(up.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await asyncio.to_thread(up.write, bytes(buffer))
            info = await asyncio.to_thread(up.commit)
        except BaseException:
            await asyncio.to_thread(up.abort)
            raise
        return volume_body(info)

    async def download(self, pool: str, name: str) -> tuple[AsyncIterator[bytes], int]:
        """Volume *name*'s file, in chunks of :data:`CHUNK`, and its size."""
        f, size = await asyncio.to_thread(self.pool(pool).open_download, name)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                it = iter_chunks(f, size, CHUNK)
                while True:
                    data = await asyncio.to_thread(next, it, b"")
                    if not data:
                        return
                    yield data
            finally:
                f.close()

        return chunks(), size

    async def blklist(self, name: str) -> list[DiskSource]:
        dom = self.driver.lookup(name)
        return await asyncio.to_thread(self._blklist, dom.definition)

    def _blklist(self, d: DomainDef) -> list[DiskSource]:
        out = []
        for disk in d.devices.disks:
            source = disk.source_file
            if disk.type == "volume" and self.driver.pools is not None:
                try:
                    source = str(self.pools.get(disk.source_pool).volume_path(disk.source_volume))
                except VmferryError:
                    source = ""
            out.append(
                DiskSource(
                    target=disk.target_dev,
                    device=disk.device,
                    type=disk.type,
                    format=disk.driver_type,
                    source=source,
                    pool=disk.source_pool,
                    volume=disk.source_volume,
                )
            )
        return out


def _definitions(dom: QemuDomain) -> Iterator[DomainDef]:
    yield dom.definition
    if dom.persistent is not None and dom.persistent is not dom.definition:
        yield dom.persistent


def _volume_names(pool: Pool) -> Iterator[str]:
    for entry in os.scandir(pool.path):
        if not entry.name.startswith(".") and entry.is_file():
            yield entry.name


def _opens(pool: Pool, d: DomainDef, name: str) -> bool:
    """Whether a disk of *d* opens volume *name* of *pool* (as its top or a backing file)."""
    for disk in d.devices.disks:
        if disk.type != "volume" or disk.source_pool != pool.name:
            continue
        if disk.source_volume == name:
            return True
        try:
            chain = pool.chain(disk.source_volume, disk.driver_type)
        except VmferryError:
            continue  # a broken chain opens nothing
        if any(layer.name == name for layer in chain):
            return True
    return False
