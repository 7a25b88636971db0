"""Cluster membership: which hosts there are, whether they are up, and what runs where.

Without etcd (the embedded default) the members are ``[cluster] peers`` plus
every host that writes a heartbeat into the lockspace:
``<lockspace>/hosts/<host-uuid>.json``, rewritten (atomically) every
``heartbeat_interval`` seconds with the host's name, URI, free memory and
CPUs, and its running domains. A heartbeat older than :data:`DOWN_AFTER`
intervals marks the host ``down``; a peer that never wrote one is
``unknown``. The answering host always describes itself fresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from vmferry.api.models import ClusterHost, ClusterInfo, ClusterVm
from vmferry.daemon.config import ClusterConfig
from vmferry.daemon.host import HostIdentity
from vmferry.daemon.state import atomic_write

log = logging.getLogger(__name__)

#: Heartbeats missed before a host counts as down.
DOWN_AFTER = 3
#: A heartbeat file larger than this is not read (a shared directory is not trusted blindly).
MAX_HEARTBEAT_BYTES = 1 << 20


def meminfo() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of this host in KiB."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "MemTotal"):
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values.get("MemAvailable", 0), values.get("MemTotal", 0)


class ClusterView(Protocol):
    """How this host keeps and shows its membership (lockspace or etcd)."""

    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def snapshot(self) -> ClusterInfo: ...


class Membership:
    """This host's view of the cluster (the lockspace flavour; etcd has its own)."""

    def __init__(
        self,
        config: ClusterConfig,
        host: HostIdentity,
        *,
        uri: str,
        migration_address: str,
        vms: Callable[[], list[ClusterVm]],
        backend: str,
        maintenance: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.host = host
        self.uri = config.uri or uri
        self.migration_address = migration_address
        self._vms = vms
        self._maintenance = maintenance
        self.backend = backend
        self._task: asyncio.Task[None] | None = None

    @property
    def hosts_dir(self) -> Path | None:
        return Path(self.config.lockspace) / "hosts" if self.config.lockspace else None

    def local(self) -> ClusterHost:
        """This host, now."""
        free, total = meminfo()
        return ClusterHost(
            name=self.host.hostname,
            uuid=self.host.uuid,
            uri=self.uri,
            state="up",
            self=True,
            maintenance=self._maintenance(),
            memory_free_kib=free,
            memory_total_kib=total,
            cpus=os.cpu_count() or 0,
            load1=os.getloadavg()[0],
            migration_address=self.migration_address,
            last_seen=time.time(),
            vms=[vm.model_copy(update={"host": "", "host_uuid": ""}) for vm in self._vms()],
        )

    def beat(self) -> None:
        """Write this host's heartbeat (atomically: readers never see half a file)."""
        where = self.hosts_dir
        if where is None:
            return
        try:
            where.mkdir(parents=True, exist_ok=True)
            me = self.local().model_copy(update={"self": False})
            atomic_write(where / f"{self.host.uuid}.json", me.model_dump_json(), mode=0o644)
        except OSError as exc:
            log.warning("cannot write the heartbeat into %s: %s", where, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.beat)
            await asyncio.sleep(self.config.heartbeat_interval)

    def start(self) -> None:
        if self.hosts_dir is not None and self._task is None and self.backend != "etcd":
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _read_heartbeats(self) -> list[ClusterHost]:
        where = self.hosts_dir
        if where is None:
            return []
        found = []
        try:
            files = sorted(where.glob("*.json"))
        except OSError:
            return []
        for path in files:
            try:
                if path.stat().st_size > MAX_HEARTBEAT_BYTES:
                    continue
                found.append(ClusterHost.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError) as exc:
                log.debug("ignoring heartbeat %s: %s", path, exc)
        return found

    async def snapshot(self) -> ClusterInfo:
        """Every host and every VM, for ``cluster list``."""
        return await asyncio.to_thread(self.snapshot_now)

    def snapshot_now(self) -> ClusterInfo:
        """:meth:`snapshot`, read from the lockspace in this thread."""
        now = time.time()
        stale_after = DOWN_AFTER * self.config.heartbeat_interval
        hosts: dict[str, ClusterHost] = {}
        for seen in self._read_heartbeats():
            if seen.uuid == self.host.uuid or not seen.uuid:
                continue
            state = "up" if now - seen.last_seen <= stale_after else "down"
            hosts[seen.uuid] = seen.model_copy(update={"state": state, "self": False})
        hosts[self.host.uuid] = self.local()
        known_uris = {h.uri for h in hosts.values()}
        listed = sorted(hosts.values(), key=lambda h: h.name)
        listed += [ClusterHost(uri=uri) for uri in self.config.peers if uri not in known_uris]
        vms = []
        for h in listed:
            for vm in h.vms:
                vm.host, vm.host_uuid = h.name, h.uuid
            if h.state != "down":  # a down host's guests may run elsewhere by now
                vms.extend(h.vms)
        return ClusterInfo(
            backend=self.backend,
            hosts=listed,
            vms=sorted(vms, key=lambda v: (v.name, v.host)),
        )
