"""Tunnelled p2p migration: the stream inside the daemons' mutual-TLS connection, real QEMU.

The destination pauses after Prepare (a failpoint) so the test can look at the
incoming QEMU: tunnelled, it has no listening TCP socket; a direct hop's QEMU
(the control) listens on a migration port.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_postcopy import Background
from vmferry.client import AsyncClient
from vmferry.client import migration_calls as mc
from vmferry.client.migrate import MigrationReport, migrate_p2p
from vmferry.client.pipe import open_pipe
from vmferry.client.transport import parse_uri
from vmferry.errors import ErrorCode, VmferryError
from vmferry.failpoints import DIR_ENV, ENV_VAR
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.tunnel import UPGRADE
from vmferry.pki import init_pki
from vmferry.testguest import Heartbeat, check_continuity
from vmferry.testing import Host, hosts, wait_heartbeat

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE
TUNNELLED = LIVE | MigrateFlags.PEER2PEER | MigrateFlags.TUNNELLED
POINT = "dst-prepare-after"


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports process *pid* listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _pause_prepare_on_second(made: list[Host]) -> None:
    hits = made[1].root / "failpoints"
    hits.mkdir()
    made[1].extra_env.update({ENV_VAR: f"{POINT}=pause", DIR_ENV: str(hits)})


def _intact(host: Host, name: str, before: Heartbeat) -> Heartbeat:
    with host.client() as c:
        info = c.dominfo(name)
        assert (info.state, info.job.async_job) == ("running", "none"), info
        after = wait_heartbeat(c, name, after=before)
    check_continuity(before, after)
    return after


async def _attach(host: Host, uri: str, name: str, session: str, stream: str = "") -> None:
    """Ask *host* for the tunnel of its incoming *name* (as the source daemon does)."""
    call = mc.tunnel(name, session, stream)
    peer, _ = await open_pipe(
        parse_uri(uri), host.pki_dir, call.path, call.headers or {}, UPGRADE, timeout=60
    )
    peer.close()
    raise AssertionError(f"{uri} gave the tunnel of {name} to a stranger")


def _refused_attach(
    host: Host, uri: str, name: str, session: str, stream: str = ""
) -> VmferryError:
    with pytest.raises(VmferryError) as err:
        asyncio.run(_attach(host, uri, name, session, stream))
    return err.value


def _hop_seen_at_prepare(
    src: Host, dst: Host, name: str, flags: MigrateFlags, *, strangers: bool = False
) -> set[int]:
    """
    Run a p2p hop to *dst* (which pauses after Prepare); its QEMU's listening ports then.

    :param strangers: Meanwhile, callers without the preparing session try to take
        the tunnel (with the cluster's certificate, and locally): refused, the hop goes on.
    """
    hits = dst.root / "failpoints"
    for leftover in hits.iterdir():
        leftover.unlink()

    async def run() -> MigrationReport:
        async with AsyncClient(src.uri) as s:
            return await migrate_p2p(s, dst.tls_uri, name, flags)

    job = Background(run)
    deadline = time.monotonic() + 90
    while not (hits / f"{POINT}.hit").exists():
        assert time.monotonic() < deadline, "Prepare never reached its failpoint"
        assert job.error is None, job.error
        time.sleep(0.05)
    pids = dst.qemu_pids()
    assert len(pids) == 1, pids  # the incoming QEMU, started by Prepare
    ports = _listening_ports(pids[0])
    if strangers:
        for uri in (dst.tls_uri, dst.uri):
            for session in (uuid.uuid4().hex, ""):
                err = _refused_attach(dst, uri, name, session)
                assert err.code == ErrorCode.AUTH_FAILED, err
        if flags & MigrateFlags.copy_storage():
            err = _refused_attach(dst, dst.tls_uri, name, uuid.uuid4().hex, stream="nbd")
            assert err.code == ErrorCode.AUTH_FAILED, err
        assert job.error is None, job.error
    (hits / f"{POINT}.release").touch()
    job.join()
    assert job.error is None, job.error
    return ports


def test_tunnelled_p2p_opens_no_migration_port() -> None:
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    with hosts(2, pki_dir=pki, setup=_pause_prepare_on_second) as (a, b):
        hb = a.boot_guest("tun1")
        assert _hop_seen_at_prepare(a, b, "tun1", TUNNELLED, strangers=True) == set()
        hb = _intact(b, "tun1", hb)

        async def back() -> None:  # tunnelled again, the other way (no failpoint on a)
            async with AsyncClient(b.uri) as s:
                await migrate_p2p(s, a.tls_uri, "tun1", TUNNELLED)

        asyncio.run(back())
        hb = _intact(a, "tun1", hb)
        # the control: a direct hop's incoming QEMU listens on a migration port of b
        ports = _hop_seen_at_prepare(a, b, "tun1", LIVE | MigrateFlags.PEER2PEER)
        assert ports and all(b.port_min <= p <= b.port_min + b.port_span for p in ports), ports
        _intact(b, "tun1", hb)


def test_tunnelled_is_peer_to_peer_only() -> None:
    with hosts(2) as (a, b):
        a.boot_guest("tun2")

        async def client_managed() -> None:
            from vmferry.client.migrate import migrate

            async with AsyncClient(a.uri) as s, AsyncClient(b.uri) as d:
                await migrate(s, d, "tun2", LIVE | MigrateFlags.TUNNELLED)

        with pytest.raises(VmferryError) as err:
            asyncio.run(client_managed())
        assert err.value.code == ErrorCode.INVALID_ARG
        # a tunnel for a domain that is not a prepared tunnelled migration is refused
        assert _refused_attach(b, b.uri, "tun2", uuid.uuid4().hex).code == ErrorCode.NO_DOMAIN
        err = _refused_attach(a, a.uri, "tun2", uuid.uuid4().hex)  # running here, not incoming
        assert err.code == ErrorCode.OPERATION_INVALID
        assert "no tunnelled migration" in err.message
        with a.client() as c:
            info = c.dominfo("tun2")
            assert (info.state, info.job.async_job) == ("running", "none")
