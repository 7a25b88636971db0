"""VM leases and membership in etcd, through etcd's v3 JSON gateway (httpx, no gRPC).

Each daemon grants itself an etcd lease (its *session*, ``[cluster] etcd_ttl``
seconds) and keeps it alive; everything it owns is bound to it:

- ``/vmferry/hosts/<host-uuid>``: its :class:`~vmferry.api.models.ClusterHost`
  record (name, URI, free memory, CPUs, running VMs), rewritten every heartbeat;
- ``/vmferry/vms/<domain-uuid>``: a VM lease, whose value is the owner's host
  UUID. Taken with a transaction (``create_revision == 0``: nobody has it),
  handed over in a migration with one comparing the owner (the source, from
  the cookie), released with one comparing the owner too (a late release never
  deletes the next owner's key).

When the session dies (the host crashed or was cut off) etcd deletes all its
keys after the TTL, so another host may start its guests: fencing
(:class:`EtcdSession`) pauses them here before that can happen.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from pydantic import ValidationError

from vmferry.api.models import ClusterHost, ClusterInfo, ClusterVm
from vmferry.daemon.lease import LeaseOwner, check_uuid, lease_held
from vmferry.errors import ErrorCode, VmferryError

log = logging.getLogger(__name__)

PREFIX = "/vmferry/"
HOSTS = PREFIX + "hosts/"
VMS = PREFIX + "vms/"
#: One etcd request may take this long before the next endpoint is tried.
REQUEST_TIMEOUT_S = 2.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for every key starting with *prefix*."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class EtcdError(Exception):
    """etcd could not be reached, or refused the request."""


class Etcd:
    """The few calls of etcd's v3 JSON gateway vmferry needs, over every endpoint in turn."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = list(endpoints)
        self._http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
        self._current = 0

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            endpoint = self.endpoints[(self._current + i) % len(self.endpoints)]
            try:
                response = await self._http.post(endpoint.rstrip("/") + path, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{endpoint}: {type(exc).__name__}")
                continue
            if response.status_code != 200:
                errors.append(f"{endpoint}: HTTP {response.status_code} {response.text[:200]}")
                continue
            self._current = (self._current + i) % len(self.endpoints)
            data = response.json()
            if not isinstance(data, dict):
                raise EtcdError(f"{endpoint}: unexpected answer to {path}")
            return data
        raise EtcdError("; ".join(errors) or "no etcd endpoint")

    async def grant(self, ttl: int) -> str:
        data = await self.call("/v3/lease/grant", {"TTL": ttl})
        return str(data["ID"])

    async def keepalive(self, lease: str) -> int:
        """Refresh *lease*; its TTL left (0: it expired)."""
        data = await self.call("/v3/lease/keepalive", {"ID": lease})
        result = data.get("result", data)
        return int(result.get("TTL", 0) or 0)

    async def revoke(self, lease: str) -> None:
        await self.call("/v3/lease/revoke", {"ID": lease})

    async def put(self, key: str, value: str, lease: str = "") -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        await self.call("/v3/kv/put", body)

    async def get(self, key: str) -> str | None:
        data = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _unb64(kvs[0].get("value", "")) if kvs else None

    async def get_prefix(self, prefix: str) -> dict[str, str]:
        data = await self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        )
        return {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in data.get("kvs") or []}

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        data = await self.call("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(data.get("succeeded"))


def _absent(key: str) -> dict[str, Any]:
    return {"target": "CREATE", "key": _b64(key), "result": "EQUAL", "create_revision": "0"}


def _owned_by(key: str, owner: str) -> dict[str, Any]:
    return {"target": "VALUE", "key": _b64(key), "result": "EQUAL", "value": _b64(owner)}


def _put(key: str, value: str, lease: str) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": lease}}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


class EtcdSession:
    """This host's etcd lease, kept alive; calls *on_lost* once it can no longer be sure of it.

    The deadline (:attr:`deadline_s`, a third of the TTL short of it) passes
    before etcd can expire the session, so the guests are paused here before
    another host may take their leases.
    """

    def __init__(self, etcd: Etcd, ttl: int, on_lost: Callable[[], Awaitable[None]]) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.deadline_s = ttl * 2 / 3
        self.lease = ""
        self._on_lost = on_lost
        self._last_ok = 0.0
        self.lost = asyncio.Event()

    async def open(self) -> None:
        self.lease = await self.etcd.grant(self.ttl)
        self._last_ok = time.monotonic()
        self.lost.clear()

    async def run(self, on_renewed: Callable[[], Awaitable[None]]) -> None:
        """Keep the session alive; after a loss, open a new one and call *on_renewed*."""
        while True:
            await asyncio.sleep(self.ttl / 6)
            if self.lost.is_set():
                try:
                    await self.open()
                except EtcdError:
                    continue
                log.warning("etcd session renewed (lease %s)", self.lease)
                await on_renewed()
                continue
            try:
                alive = (
                    await asyncio.wait_for(
                        self.etcd.keepalive(self.lease), timeout=REQUEST_TIMEOUT_S
                    )
                    > 0
                )
            except (EtcdError, TimeoutError, KeyError, ValueError):
                alive = True  # unknown yet: the deadline decides
                failed = True
            else:
                failed = False
            if not failed and alive:
                self._last_ok = time.monotonic()
            elif not failed or time.monotonic() - self._last_ok >= self.deadline_s:
                log.error("etcd session lost: pausing this host's guests (lease-lost)")
                self.lost.set()
                await self._on_lost()


class EtcdLeases:
    """VM leases as etcd keys bound to this host's session."""

    kind = "etcd"

    def __init__(self, etcd: Etcd, session: EtcdSession, me: LeaseOwner) -> None:
        self.etcd = etcd
        self.session = session
        self.me = me
        self._held: set[str] = set()
        self._releases: dict[str, asyncio.Task[None]] = {}

    async def acquire(self, uuid: str, name: str, *, previous: str = "") -> None:
        uuid = check_uuid(uuid)
        pending = self._releases.pop(uuid, None)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)  # in order
        if self.session.lost.is_set():
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot take the lease of domain '{name}': this host lost its etcd session",
            )
        key, lease = VMS + uuid, self.session.lease
        try:
            taken = False
            # A few rounds: the previous owner's release may delete the key between two tries.
            for _ in range(3):
                taken = await self.etcd.txn([_absent(key)], [_put(key, self.me.host_uuid, lease)])
                for owner in sorted({self.me.host_uuid, previous} - {""}):
                    if taken:
                        break
                    # ours already (re-bound to the current session), or handed over to us
                    taken = await self.etcd.txn(
                        [_owned_by(key, owner)], [_put(key, self.me.host_uuid, lease)]
                    )
                if taken or await self.etcd.get(key):
                    break
            if not taken:
                raise lease_held(name, await self.holder(uuid))
        except EtcdError as exc:
            raise VmferryError(
                ErrorCode.OPERATION_FAILED,
                f"cannot take the lease of domain '{name}': etcd: {exc}",
            ) from exc
        self._held.add(uuid)

    def release(self, uuid: str) -> None:
        if uuid not in self._held:
            return
        self._held.discard(uuid)
        key = VMS + uuid

        async def delete() -> None:
            try:  # only if still ours: a hand-over may have made it the destination's
                await self.etcd.txn([_owned_by(key, self.me.host_uuid)], [_delete(key)])
            except EtcdError as exc:
                log.warning(
                    "releasing the lease of %s in etcd: %s (it expires with the session)", uuid, exc
                )

        self._releases[uuid] = asyncio.get_running_loop().create_task(delete())

    def holds(self, uuid: str) -> bool:
        return uuid in self._held

    def inheritable(self, uuid: str) -> list[int]:
        return []  # the key lives in this daemon's session, not in a file QEMU could keep open

    def held(self) -> set[str]:
        return set(self._held)

    def forget(self, uuid: str) -> None:
        """Drop *uuid* from what this host holds, without touching etcd (the session died)."""
        self._held.discard(uuid)

    async def holder(self, uuid: str) -> LeaseOwner | None:
        try:
            owner = await self.etcd.get(VMS + check_uuid(uuid))
            if not owner:
                return None
            record = await self.etcd.get(HOSTS + owner)
        except EtcdError:
            return None
        name = ""
        if record:
            try:
                name = ClusterHost.model_validate_json(record).name
            except ValidationError:
                pass
        return LeaseOwner(owner, name)

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases.values(), return_exceptions=True)
        self._held.clear()


class EtcdMembership:
    """Membership in etcd: every live host's record, and the VM keys saying who runs what."""

    def __init__(
        self,
        etcd: Etcd,
        session: EtcdSession,
        local: Callable[[], ClusterHost],
        interval: float,
    ) -> None:
        self.etcd = etcd
        self.session = session
        self._local = local
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        if self.session.lost.is_set():
            return
        me = self._local().model_copy(update={"self": False})
        try:
            await self.etcd.put(HOSTS + me.uuid, me.model_dump_json(), self.session.lease)
        except EtcdError as exc:
            log.warning("cannot register this host in etcd: %s", exc)

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def snapshot(self) -> ClusterInfo:
        local = self._local()
        try:
            records = await self.etcd.get_prefix(HOSTS)
            owners = await self.etcd.get_prefix(VMS)
        except EtcdError as exc:
            local.state = "no-etcd"
            log.warning("cluster list: etcd: %s", exc)
            return ClusterInfo(backend="etcd", hosts=[local])
        hosts: dict[str, ClusterHost] = {}
        for value in records.values():
            try:
                seen = ClusterHost.model_validate(json.loads(value))
            except (ValueError, ValidationError):
                continue
            if seen.uuid and seen.uuid != local.uuid:
                hosts[seen.uuid] = seen.model_copy(update={"state": "up", "self": False})
        if self.session.lost.is_set():
            local.state = "fenced"
        hosts[local.uuid] = local
        vms = []
        for key, owner in owners.items():
            uuid = key.removeprefix(VMS)
            host = hosts.get(owner)
            known = next((v for v in host.vms if v.uuid == uuid), None) if host else None
            vms.append(
                ClusterVm(
                    name=known.name if known else "",
                    uuid=uuid,
                    state=known.state if known else "",
                    host=host.name if host else "",
                    host_uuid=owner,
                )
            )
        return ClusterInfo(
            backend="etcd",
            hosts=sorted(hosts.values(), key=lambda h: h.name),
            vms=sorted(vms, key=lambda v: (v.name, v.host)),
        )
