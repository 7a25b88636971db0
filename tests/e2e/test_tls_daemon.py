"""The real daemon over mutual TLS: clients need a CA-signed certificate; p2p uses TLS too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmferry.client import AsyncClient, Client
from vmferry.client.migrate import migrate, migrate_p2p
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.pki import init_pki
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import hosts, wait_heartbeat

pytestmark = pytest.mark.qemu


def test_tls_clients_and_p2p_over_tls() -> None:
    pki = Path(tempfile.mkdtemp(prefix="vfpki", dir="/tmp"))
    init_pki(pki)
    other = Path(tempfile.mkdtemp(prefix="vfpki2", dir="/tmp"))
    init_pki(other)
    with hosts(2, pki_dir=pki) as (a, b):
        with Client(a.tls_uri, pki_dir=pki) as c:
            assert c.host().hostname == "host0"
            c.create(guest_xml("tls1"))
            hb = wait_heartbeat(c, "tls1")
        with pytest.raises(VmferryError) as err, Client(a.tls_uri, pki_dir=other) as c:
            c.host()
        assert err.value.code in (ErrorCode.CONNECT_FAILED, ErrorCode.RPC_FAILED)

        async def hops() -> None:
            async with (
                AsyncClient(a.tls_uri, pki_dir=pki) as sa,
                AsyncClient(b.tls_uri, pki_dir=pki) as sb,
            ):
                await migrate(sa, sb, "tls1", MigrateFlags.LIVE)
                await migrate_p2p(sb, a.tls_uri, "tls1", MigrateFlags.LIVE)

        asyncio.run(hops())
        with Client(a.tls_uri, pki_dir=pki) as c:
            assert c.dominfo("tls1").state == "running"
            check_continuity(hb, wait_heartbeat(c, "tls1", after=hb))
            c.destroy("tls1")


def test_plain_tcp_is_refused_without_insecure(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmferry.daemon.main",
            "--state-dir",
            str(tmp_path / "s"),
            "--listen",
            "tcp://127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "insecure" in out.stderr and "[invalid-arg]" in out.stderr
