"""Tunnelled storage migration: the disks' NBD connections are pipes between the daemons too.

``--p2p --tunnelled --copy-storage-all`` over the daemons' mutual TLS: the
destination's NBD server listens on a daemon-private unix socket (no port),
each NBD connection of the source QEMU is one more upgraded pipe. The guest
writes and verifies its disk meanwhile; memory and disk are checked after
each hop and the copied volume is compared with the source's.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_migration_tunnel import _hop_seen_at_prepare, _pause_prepare_on_second
from tests.e2e.test_storage_migration import (
    BLOCKS,
    SIZE,
    PoolHost,
    _copied,
    _heartbeat,
    _on,
    _resume_and_check,
    boot,
    volume,
    writing_disk,
)
from vmferry.client import AsyncClient
from vmferry.client.migrate import MigrationReport, migrate_p2p
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.pki import init_pki
from vmferry.testing import Host, hosts
from vmferry.testing.disk import create_image, make_image_dir

pytestmark = pytest.mark.qemu

TUNNELLED_ALL = (
    MigrateFlags.LIVE
    | MigrateFlags.PEER2PEER
    | MigrateFlags.TUNNELLED
    | MigrateFlags.NON_SHARED_DISK
)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Host, Host]]:
    shared = make_image_dir()
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    try:
        with hosts(
            2,
            host_type=PoolHost,
            image_roots=[shared],
            pki_dir=pki,
            setup=_pause_prepare_on_second,
        ) as (a, b):
            yield a, b
    finally:
        subprocess.run(["rm", "-rf", str(shared), str(pki)], check=False)


def _tunnelled(src: Host, dst: Host, name: str, flags: MigrateFlags) -> MigrationReport:
    async def run() -> MigrationReport:
        async with AsyncClient(src.uri) as s:
            return await migrate_p2p(s, dst.tls_uri, name, flags, MigrationParams())

    return asyncio.run(run())


def test_tunnelled_copy_storage_all_there_and_back(pair: tuple[Host, Host]) -> None:
    a, b = pair
    name, vol = "tst-raw", "tst-raw.raw"
    create_image(volume(a, vol), SIZE, fmt="raw", stamp_blocks=BLOCKS)
    hb = boot(a, name, writing_disk(vol, "raw"))
    # b pauses after Prepare: its QEMU (memory and NBD server) listens on no TCP port;
    # meanwhile a stranger asking for an NBD tunnel without the session is refused
    assert _hop_seen_at_prepare(a, b, name, TUNNELLED_ALL, strangers=True) == set()
    _on(b, a, name, hb)
    assert volume(b, vol).exists()
    hb = _heartbeat(b, name)
    _tunnelled(b, a, name, TUNNELLED_ALL | MigrateFlags.PAUSED)
    _on(a, b, name, hb, state="paused")
    _copied(volume(b, vol), volume(a, vol))
    _resume_and_check(a, name, hb)
    for host in (a, b):
        volume(host, vol).unlink()
