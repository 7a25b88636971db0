"""The pools of one host, by name, and what a domain's disks resolve to on it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from vmferry.domain.model import DiskDef, DomainDef
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.command import BlockLayer
from vmferry.storage.pool import Layer, Pool, PoolConfig, walk_chain

DEFAULT_POOL = "default"


def default_pool_path(state_root: Path) -> Path:
    """Where the pool ``default`` lives when the config names no pool."""
    return Path(state_root) / "pools" / DEFAULT_POOL


class Pools:
    """Every pool of this host.

    :param roots: directories ``type='file'`` disks and their backing files
        must lie below (``[paths] roots``; the pools count too).
    """

    def __init__(self, pools: Iterable[Pool], *, roots: Sequence[str | Path] = ()) -> None:
        self._pools = {p.name: p for p in pools}
        self.roots = tuple(os.path.realpath(r) for r in (*roots, *self.paths()))

    @classmethod
    def from_config(
        cls,
        configs: Sequence[PoolConfig],
        *,
        state_root: Path,
        owner: tuple[int, int] | None = None,
        roots: Sequence[str | Path] = (),
    ) -> Pools:
        """The configured pools, or the pool ``default`` under *state_root* when none is."""
        if not configs:
            configs = [PoolConfig(DEFAULT_POOL, default_pool_path(state_root))]
        return cls([Pool(c.name, c.path, owner=owner) for c in configs], roots=roots)

    def set_owner(self, owner: tuple[int, int] | None) -> None:
        """Give new volumes of every pool this ``(uid, gid)`` (the QEMU user)."""
        for pool in self:
            pool.owner = owner

    def ensure(self) -> None:
        """Create every pool's directory."""
        for pool in self:
            pool.ensure()

    def __iter__(self) -> Iterator[Pool]:
        return iter(sorted(self._pools.values(), key=lambda p: p.name))

    def paths(self) -> list[Path]:
        return [p.path for p in self._pools.values()]

    def get(self, name: str) -> Pool:
        """:raise VmferryError: ``NO_STORAGE_POOL``."""
        pool = self._pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self._pools)) or "none"
            raise VmferryError(
                ErrorCode.NO_STORAGE_POOL,
                f"Storage pool not found: no pool '{name}' on this host (pools: {known}; "
                "configure [pools.NAME] path = ... in the daemon config)",
            )
        return pool

    # -- disks ------------------------------------------------------------------------------

    def disk_chain(self, disk: DiskDef) -> list[Layer]:
        """The images *disk* opens, top first (blocking: reads image headers).

        A volume is looked up in this host's pool of its name; a file's
        backing files must lie below a root. An empty CD-ROM has no layers.
        """
        if disk.type == "volume":
            pool = self.get(disk.source_pool)
            return pool.chain(disk.source_volume, disk.driver_type)
        if not disk.source_file:
            return []
        return walk_chain(disk.source_file, disk.driver_type, self._in_roots)

    def _in_roots(self, real: str) -> str:
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            raise VmferryError(
                ErrorCode.ACCESS_DENIED,
                f"backing file {real} is not below an allowed directory "
                f"(allowed: {', '.join(self.roots) or 'none'}; set [paths] roots)",
            )
        return ""

    def resolve(self, d: DomainDef) -> dict[str, list[BlockLayer]]:
        """Target dev -> the images of each disk with a medium, for QEMU's command line.

        :raise VmferryError: ``NO_STORAGE_POOL``, ``NO_STORAGE_VOL`` (naming
            the disk), ``ACCESS_DENIED`` (a chain leaves its pool or the roots).
        """
        chains: dict[str, list[BlockLayer]] = {}
        for disk in d.devices.disks:
            try:
                layers = self.disk_chain(disk)
            except VmferryError as err:
                raise VmferryError(err.code, f"disk '{disk.target_dev}': {err.message}") from None
            if layers:
                chains[disk.target_dev] = [BlockLayer(x.path, x.format) for x in layers]
        return chains

    def uses(self, d: DomainDef, pool: str, volume: str) -> bool:
        """Whether *d* names volume *volume* of pool *pool* (by name, not through chains)."""
        return any(
            disk.type == "volume" and disk.source_pool == pool and disk.source_volume == volume
            for disk in d.devices.disks
        )
