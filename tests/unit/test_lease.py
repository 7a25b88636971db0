"""VM leases in a lockspace (fcntl OFD locks) and the cookie's lockstate check."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from vmferry.daemon.config import load_config
from vmferry.daemon.lease import LeaseOwner, LockspaceLeases, NoLeases
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.cookie import MigrationCookie, check_lockstate

A = LeaseOwner(str(uuid.uuid4()), "host-a")
B = LeaseOwner(str(uuid.uuid4()), "host-b")


def test_a_lease_is_held_by_one_host_at_a_time(tmp: Path) -> None:
    a, b = LockspaceLeases(tmp, A), LockspaceLeases(tmp, B)
    vm = str(uuid.uuid4())
    asyncio.run(a.acquire(vm, "web"))
    asyncio.run(a.acquire(vm, "web"))  # again: a no-op, still held
    assert a.holds(vm) and not b.holds(vm)
    with pytest.raises(VmferryError) as refused:
        asyncio.run(b.acquire(vm, "web"))
    assert refused.value.code == ErrorCode.LEASE_HELD
    assert "host-a" in refused.value.message and A.host_uuid in refused.value.message
    assert b.holder_now(vm) == A and a.holder_now(vm) == A
    a.release(vm)
    assert not a.holds(vm) and b.holder_now(vm) is None
    asyncio.run(b.acquire(vm, "web"))
    with pytest.raises(VmferryError, match="host-b"):
        asyncio.run(a.acquire(vm, "web"))
    asyncio.run(b.close())  # a daemon that stops lets go of its locks
    asyncio.run(a.acquire(vm, "web"))
    assert a.holds(vm)


def test_lease_keys_must_be_uuids(tmp: Path) -> None:
    leases = LockspaceLeases(tmp, A)
    for bad in ("../../etc/passwd", "x", ""):
        with pytest.raises(VmferryError) as err:
            asyncio.run(leases.acquire(bad, "evil"))
        assert err.value.code == ErrorCode.INVALID_ARG
    assert list(tmp.iterdir()) == []


def test_no_cluster_allows_everything() -> None:
    leases = NoLeases()
    vm = str(uuid.uuid4())
    asyncio.run(leases.acquire(vm, "x"))
    assert leases.holds(vm) and asyncio.run(leases.holder(vm)) is None
    leases.release(vm)
    assert not leases.holds(vm)


def test_cookie_lockstate_must_match_the_destination() -> None:
    cookie = MigrationCookie(name="x", uuid=str(uuid.uuid4()), hostname="a", hostuuid=A.host_uuid)
    check_lockstate(cookie, "none")  # no lockstate: a host outside any cluster
    with pytest.raises(VmferryError) as err:
        check_lockstate(cookie, "lockspace")
    assert err.value.code == ErrorCode.NO_SUPPORT
    cookie.lock_driver, cookie.leases = "lockspace", f"{A.host_uuid}:released"
    check_lockstate(cookie, "lockspace")
    with pytest.raises(VmferryError, match="different from target etcd"):
        check_lockstate(cookie, "etcd")


def test_cluster_config_is_checked(tmp: Path) -> None:
    cfg = tmp / "c.toml"
    cfg.write_text('[cluster]\nlockspace = "/srv/ls"\npeers = ["tls://b:16514"]\n')
    config = load_config(cfg)
    assert config.cluster.lockspace == "/srv/ls" and config.cluster.peers == ["tls://b:16514"]
    for bad in ('lockspace = "rel"', 'peers = ["http://x"]', "heartbeat_interval = 0"):
        cfg.write_text(f"[cluster]\n{bad}\n")
        with pytest.raises(VmferryError) as err:
            load_config(cfg)
        assert err.value.code == ErrorCode.INVALID_ARG
