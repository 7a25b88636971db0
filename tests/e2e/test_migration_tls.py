"""Encrypted migration streams (QEMU's TLS with the vmferry PKI), end to end on real QEMU.

The stream's first bytes are captured on loopback by a relay the test puts
between the two QEMUs: a TLS record (0x16 0x03) when encrypted, QEMU's
``QEVM`` magic when plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmferry.client import AsyncClient
from vmferry.client.migrate import RemoteDestination, RemoteSource, migrate_p2p, open_session
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.migration.params import MigrationParams
from vmferry.migration.protocol import migrate_v3
from vmferry.pki import init_pki
from vmferry.testguest import Heartbeat, check_continuity
from vmferry.testing import Host, hosts, wait_heartbeat
from vmferry.testing.steps import assert_only_on

pytestmark = pytest.mark.qemu

LIVE = MigrateFlags.LIVE
TLS_RECORD = b"\x16\x03"  # handshake record, TLS 1.x
QEMU_MAGIC = b"QEVM"
HEAD = 512  # bytes kept of each stream the source side sends
TLS_AES_128_GCM_SHA256 = 0x1301
NBD_CLIENT_MAGIC = b"IHAVEOPT"  # the NBD client's options (before STARTTLS, in the clear)


def _pki() -> Path:
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    return pki


class _Relay:
    """Forwards each connection to the real port and keeps the first bytes of each stream
    (*heads*: the source's side; *answers*: the destination's, its ServerHello when TLS)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.answers: list[bytes] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            tr, tw = await asyncio.open_connection(host, port)
            self.heads.append(b"")
            self.answers.append(b"")
            index = len(self.heads) - 1

            async def pump(
                src: asyncio.StreamReader, dst: asyncio.StreamWriter, kept: list[bytes]
            ) -> None:
                head = bytearray()
                with contextlib.suppress(OSError, ConnectionError):
                    while data := await src.read(65536):
                        if len(head) < HEAD:
                            head.extend(data[: HEAD - len(head)])
                            kept[index] = bytes(head)
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(OSError):
                    dst.close()

            await asyncio.gather(pump(r, tw, self.heads), pump(tr, w, self.answers))

        def spawn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(handle(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._server = await asyncio.start_server(spawn, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()


class _ViaRelay:
    """The destination side, its stream URI swapped for the relay's."""

    def __init__(self, inner: RemoteDestination, relay: _Relay) -> None:
        self._inner = inner
        self._relay = relay

    async def prepare(
        self, xml: str, cookie: str | None, flags: MigrateFlags, params: MigrationParams
    ) -> tuple[str, str]:
        uri, out = await self._inner.prepare(xml, cookie, flags, params)
        host, _, port = uri.removeprefix("tcp:").rpartition(":")
        nbd = re.search(r'<nbd port="([0-9]+)"', out)
        if nbd:  # storage migration: the disks' NBD connections through a relay too
            relayed = await self._relay.start(host, int(nbd.group(1)))
            out = out.replace(nbd.group(0), f'<nbd port="{relayed}"')
        return f"tcp:127.0.0.1:{await self._relay.start(host, int(port))}", out

    async def finish(self, name: str, cookie: str | None, *, cancelled: bool, v3: bool) -> str:
        return await self._inner.finish(name, cookie, cancelled=cancelled, v3=v3)

    async def state(self, name: str) -> tuple[str, str]:
        return await self._inner.state(name)


@contextlib.asynccontextmanager
async def _clients(src: Host, dst: Host) -> AsyncIterator[tuple[AsyncClient, AsyncClient]]:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        yield s, d


async def _captured_hop(
    src: Host,
    dst: Host,
    name: str,
    flags: MigrateFlags,
    params: MigrationParams | None = None,
    answers: list[bytes] | None = None,
) -> list[bytes]:
    """A v3 client-managed migration through the relay; the first bytes of each stream.

    :param answers: gets the first bytes the destination sent on each stream.
    """
    relay = _Relay()
    try:
        async with (
            _clients(src, dst) as (s, d),
            open_session(s) as ss,
            open_session(d) as ds,
        ):
            dest = _ViaRelay(RemoteDestination(d, ds), relay)
            await migrate_v3(
                RemoteSource(s, ss, peer_uri=d.uri), dest, name, flags, params or MigrationParams()
            )
    finally:
        await relay.close()
    if answers is not None:
        answers.extend(relay.answers)
    return relay.heads


def _suite(answer: bytes) -> int:
    """The cipher suite a TLS ServerHello (the destination's first record) names."""
    assert answer[:1] == b"\x16" and answer[5:6] == b"\x02", answer[:16]  # handshake: ServerHello
    session_id = answer[5 + 4 + 2 + 32]  # after type, length, version, random
    at = 5 + 4 + 2 + 32 + 1 + session_id
    return int.from_bytes(answer[at : at + 2], "big")


def _boot(host: Host, name: str) -> Heartbeat:
    return host.boot_guest(name)


def _intact(host: Host, name: str, before: Heartbeat) -> Heartbeat:
    """The guest runs on *host* with its memory intact (the heartbeat goes on)."""
    with host.client() as c:
        after = wait_heartbeat(c, name, after=before)
    check_continuity(before, after)
    return after


def test_tls_hop_is_encrypted_and_plain_is_not() -> None:
    """--tls (v3 client-managed, then p2p back): TLS records on the wire; without it QEVM."""
    pki = _pki()
    with hosts(2, pki_dir=pki) as (a, b):
        hb = _boot(a, "tls1")
        answers: list[bytes] = []
        heads = asyncio.run(_captured_hop(a, b, "tls1", LIVE | MigrateFlags.TLS, answers=answers))
        assert heads and all(h.startswith(TLS_RECORD) for h in heads), heads
        # [migration] tls_channels (2 by default): the main channel and two multifd channels
        assert len(heads) >= 3, heads
        # both QEMUs prefer AES-128-GCM (tls_creds.PRIORITY): every stream negotiated it
        assert [_suite(x) for x in answers] == [TLS_AES_128_GCM_SHA256] * len(heads), answers
        hb = _intact(b, "tls1", hb)

        async def back() -> None:
            async with AsyncClient(b.uri) as sb:
                await migrate_p2p(sb, a.uri, "tls1", LIVE | MigrateFlags.TLS)

        asyncio.run(back())
        hb = _intact(a, "tls1", hb)
        # the control: the same hop without TLS shows QEMU's plain stream
        heads = asyncio.run(_captured_hop(a, b, "tls1", LIVE))
        assert heads and heads[0].startswith(QEMU_MAGIC), heads
        with b.client() as c:
            check_continuity(hb, wait_heartbeat(c, "tls1", after=hb))
            c.destroy("tls1")


def test_tls_with_multifd_and_zstd() -> None:
    """--parallel 2 with --tls: every channel is TLS; then --compressed (zstd) over multifd."""
    pki = _pki()
    with hosts(2, pki_dir=pki) as (a, b):
        hb = _boot(a, "tls2")
        flags = LIVE | MigrateFlags.TLS | MigrateFlags.PARALLEL
        heads = asyncio.run(
            _captured_hop(a, b, "tls2", flags, MigrationParams(parallel_connections=2))
        )
        assert len(heads) >= 3, heads  # the main channel and two multifd channels
        assert all(h.startswith(TLS_RECORD) for h in heads), heads
        hb = _intact(b, "tls2", hb)
        zstd = LIVE | MigrateFlags.PARALLEL | MigrateFlags.COMPRESSED
        params = MigrationParams(parallel_connections=2)
        heads = asyncio.run(_captured_hop(b, a, "tls2", zstd, params))
        assert heads and heads[0].startswith(QEMU_MAGIC), heads
        with a.client() as c:
            check_continuity(hb, wait_heartbeat(c, "tls2", after=hb))
            stats = c.jobinfo("tls2", completed=True).stats
            assert stats.get("status") == "completed", stats
            c.destroy("tls2")


def _require_tls_on_first(made: list[Host]) -> None:
    # host0 requires TLS and has the PKI; host1 has no PKI at all
    made[0].extra_config = 'tls = "required"\n'
    made[1].pki_dir, made[1].tls_port = None, 0


def test_tls_required_refuses_plain_both_ways() -> None:
    """[migration] tls = "required": no plain stream out of or into that host, v3 and p2p."""
    pki = _pki()
    with hosts(2, pki_dir=pki, setup=_require_tls_on_first) as (a, b):
        hb = _boot(a, "tls3")

        async def out_of_a() -> None:
            async with _clients(a, b) as (s, _d):
                from vmferry.client.migrate import migrate

                await migrate(s, _d, "tls3", LIVE)

        with pytest.raises(VmferryError) as err:
            asyncio.run(out_of_a())
        assert err.value.code == ErrorCode.TLS_REQUIRED, err.value
        assert "required" in err.value.message
        with pytest.raises(VmferryError) as err:
            asyncio.run(_p2p(a, b, "tls3"))
        assert err.value.code == ErrorCode.TLS_REQUIRED, err.value
        assert_only_on(a, b, "tls3", hb)
        with a.client() as c:
            c.destroy("tls3")
        hb = _boot(b, "tls4")
        with pytest.raises(VmferryError) as err:
            asyncio.run(_p2p(b, a, "tls4"))
        assert err.value.code == ErrorCode.TLS_REQUIRED, err.value
        assert "destination" in err.value.message
        assert_only_on(b, a, "tls4", hb)


def _require_tls_on_both(made: list[Host]) -> None:
    for host in made:
        host.extra_config = 'tls = "required"\n'


def test_tls_required_encrypts_without_the_flag() -> None:
    """Both hosts with a PKI and tls = "required": a hop without --tls is encrypted anyway."""
    pki = _pki()
    with hosts(2, pki_dir=pki, setup=_require_tls_on_both) as (a, b):
        hb = _boot(a, "tls5")
        heads = asyncio.run(_captured_hop(a, b, "tls5", LIVE))
        assert heads and all(h.startswith(TLS_RECORD) for h in heads), heads
        assert len(heads) >= 3, heads  # encrypted without --tls: multifd channels all the same
        hb = _intact(b, "tls5", hb)
        asyncio.run(_p2p(b, a, "tls5"))
        with a.client() as c:
            check_continuity(hb, wait_heartbeat(c, "tls5", after=hb))
            c.destroy("tls5")


def _one_tls_stream_into_second(made: list[Host]) -> None:
    made[1].extra_config = "tls_channels = 0\n"


def test_tls_channels_zero_keeps_one_stream() -> None:
    """tls_channels = 0 on either host (destination, then source): one TLS stream each way."""
    pki = _pki()
    with hosts(2, pki_dir=pki, setup=_one_tls_stream_into_second) as (a, b):
        hb = _boot(a, "tls6")
        heads = asyncio.run(_captured_hop(a, b, "tls6", LIVE | MigrateFlags.TLS))
        assert len(heads) == 1 and heads[0].startswith(TLS_RECORD), heads
        hb = _intact(b, "tls6", hb)
        heads = asyncio.run(_captured_hop(b, a, "tls6", LIVE | MigrateFlags.TLS))
        assert len(heads) == 1 and heads[0].startswith(TLS_RECORD), heads
        with a.client() as c:
            check_continuity(hb, wait_heartbeat(c, "tls6", after=hb))
            c.destroy("tls6")


async def _p2p(src: Host, dst: Host, name: str, flags: MigrateFlags = LIVE) -> None:
    async with AsyncClient(src.uri) as s:
        await migrate_p2p(s, dst.uri, name, flags)


def test_tls_storage_migration_encrypts_the_disk_copies() -> None:
    """--copy-storage-all --tls: memory and NBD streams are TLS; without --tls NBD is clear."""
    from tests.e2e.test_storage_migration import (
        BLOCKS,
        SIZE,
        PoolHost,
        _copied,
        _on,
        _resume_and_check,
        boot,
        volume,
        writing_disk,
    )
    from vmferry.testing.disk import create_image

    copy = LIVE | MigrateFlags.NON_SHARED_DISK
    pki = _pki()
    with hosts(2, pki_dir=pki, host_type=PoolHost) as (a, b):
        name, vol = "tls-st", "tls-st.raw"
        create_image(volume(a, vol), SIZE, fmt="raw", stamp_blocks=BLOCKS)
        hb = boot(a, name, writing_disk(vol, "raw"))
        heads = asyncio.run(_captured_hop(a, b, name, copy | MigrateFlags.TLS))
        nbd = [h for h in heads if NBD_CLIENT_MAGIC in h]
        assert nbd, heads  # the mirror's connection went through the relay
        for head in nbd:  # STARTTLS, then a TLS handshake; the export name never in the clear
            assert TLS_RECORD in head and b"drive-vda" not in head, head
        memory = [h for h in heads if NBD_CLIENT_MAGIC not in h]
        assert memory and all(h.startswith(TLS_RECORD) for h in memory), memory
        _on(b, a, name, hb)
        with b.client() as c:
            hb = wait_heartbeat(c, name, after=hb)
        # the control: back without --tls, the NBD client names its export in the clear
        heads = asyncio.run(_captured_hop(b, a, name, copy | MigrateFlags.PAUSED))
        nbd = [h for h in heads if NBD_CLIENT_MAGIC in h]
        assert nbd and all(b"drive-vda" in h and TLS_RECORD not in h for h in nbd), heads
        _on(a, b, name, hb, state="paused")
        _copied(volume(b, vol), volume(a, vol))
        _resume_and_check(a, name, hb)
