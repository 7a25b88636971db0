"""Storage pools and volumes on real daemons and QEMU: the chains QEMU opens, the refusals."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.e2e.test_access import AccessHost
from tests.e2e.test_qemu_command_e2e import needs_qemu, running_qemu
from tests.unit.test_qemu_command import domain_xml
from vmferry.client import AsyncClient, Client
from vmferry.client.migrate import migrate, migrate_p2p
from vmferry.domain import parse_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.migration.flags import MigrateFlags
from vmferry.storage import Pool, Pools
from vmferry.testguest import check_continuity, guest_xml
from vmferry.testing import Host, hosts, wait_heartbeat

MiB = 1 << 20


def _volume_disk(volume: str, fmt: str = "qcow2", dev: str = "vda", pool: str = "default") -> str:
    return (
        f"<disk type='volume' device='disk'><driver name='qemu' type='{fmt}' cache='none'/>"
        f"<source pool='{pool}' volume='{volume}'/><target dev='{dev}' bus='virtio'/></disk>"
    )


def _guest_with_disks(name: str, disks: str) -> str:
    return guest_xml(name, memory_mib=96, stamp_mib=8).replace("</devices>", disks + "</devices>")


def _pattern(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def _code(err: pytest.ExceptionInfo[VmferryError]) -> str:
    return str(err.value.code)


@needs_qemu
@pytest.mark.qemu
async def test_qemu_reads_through_the_chain(tmp: Path) -> None:
    """QEMU opens every layer as its own node and reads the base's data through the top."""
    pool = Pool("P", tmp / "pool")
    pool.ensure()
    pool.create_volume("base.raw", MiB, "raw")
    up = pool.begin_upload("base.raw")
    up.write(b"\x5a" * MiB)
    up.commit()
    pool.create_volume("mid.qcow2", MiB, "qcow2", backing=("base.raw", "raw"))
    pool.create_volume("top.qcow2", MiB, "qcow2", backing=("mid.qcow2", "qcow2"))
    d = parse_domain_xml(
        domain_xml(_volume_disk("top.qcow2", pool="P").replace("cache='none'", "cache='unsafe'"))
    )
    chains = Pools([pool]).resolve(d)
    async with running_qemu(d, tmp, chains=chains) as qmp:
        (vda,) = [b for b in await qmp.execute("query-block") if "virtio-disk0" in b["qdev"]]
        inserted = vda["inserted"]
        assert inserted["node-name"] == "fmt-vda" and inserted["backing_file_depth"] == 2
        nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
        files = {name: nodes[name]["file"] for name in ("file-vda", "file-vda-b1", "file-vda-b2")}
        assert files == {
            "file-vda": str(pool.path / "top.qcow2"),
            "file-vda-b1": str(pool.path / "mid.qcow2"),
            "file-vda-b2": str(pool.path / "base.raw"),
        }
        formats = [nodes[f"fmt-vda{s}"]["drv"] for s in ("", "-b1", "-b2")]
        assert formats == ["qcow2", "qcow2", "raw"]
        assert [nodes[f"fmt-vda{s}"]["ro"] for s in ("", "-b1", "-b2")] == [False, True, True]
        # qemu-io prints to QEMU's stdout, the log here: the base's bytes, read through the top
        for pattern in ("0x5a", "0x11"):
            command = f'qemu-io fmt-vda "read -P {pattern} 4096 4096"'
            await qmp.execute("human-monitor-command", {"command-line": command})
    log = (tmp / "qemu.log").read_text()
    assert "read 4096/4096 bytes" in log, log
    assert log.count("Pattern verification failed") == 1, log


@needs_qemu
@pytest.mark.qemu
def test_volumes_end_to_end(tmp: Path) -> None:
    with hosts(2, host_type=AccessHost) as (h, other):
        with Client(h.uri) as c, Client(f"unix://{h.ro_socket}") as ro:
            (pool,) = c.pool_list()
            assert pool.name == "default"
            assert pool.path == str(h.state_dir / "pools" / "default")
            with Client(other.uri) as c2:
                assert c2.pool_list()[0].path != pool.path  # each daemon its own pool

            # a raw base with known content, a qcow2 over it
            c.vol_create("default", "base.raw", 4 * MiB, "raw")
            data = _pattern(4 * MiB, 3)
            info = c.vol_upload("default", "base.raw", io.BytesIO(data))
            assert (info.format, info.capacity) == ("raw", 4 * MiB)
            top = c.vol_create("default", "top.qcow2", 8 * MiB, "qcow2", "base.raw", "raw")
            assert [(b.name, b.format) for b in top.backing] == [("base.raw", "raw")]
            assert {v.name for v in ro.vol_list("default")} == {"base.raw", "top.qcow2"}
            assert ro.vol_info("default", "top.qcow2").capacity == 8 * MiB
            st = os.stat(top.path)
            assert (st.st_uid, st.st_mode & 0o777) == (_qemu_uid(), 0o600)

            # a guest on the chain boots; QEMU holds both images
            c.create(_guest_with_disks("vg", _volume_disk("top.qcow2")))
            wait_heartbeat(c, "vg")
            (disk,) = c.domblklist("vg")
            assert (disk.target, disk.type, disk.pool, disk.volume, disk.source) == (
                "vda",
                "volume",
                "default",
                "top.qcow2",
                top.path,
            )
            (pid,) = h.qemu_pids()
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert {top.path, str(Path(pool.path) / "base.raw")} <= held

            # in use: not deleted (the base neither: it backs the disk), not overwritten
            for name in ("top.qcow2", "base.raw"):
                with pytest.raises(VmferryError, match="in use by domain 'vg'") as err:
                    c.vol_delete("default", name)
                assert _code(err) == ErrorCode.OPERATION_INVALID
            with pytest.raises(VmferryError, match="running domain 'vg'"):
                c.vol_upload("default", "base.raw", io.BytesIO(b"x"))
            c.destroy("vg")

            # download gives back exactly what was uploaded; read-only may not download
            out = io.BytesIO()
            assert c.vol_download("default", "base.raw", out) == len(data)
            assert out.getvalue() == data
            with pytest.raises(VmferryError) as err:
                ro.vol_download("default", "base.raw", io.BytesIO())
            assert _code(err) == ErrorCode.ACCESS_DENIED
            with pytest.raises(VmferryError) as err:
                ro.vol_create("default", "x", MiB)
            assert _code(err) == ErrorCode.ACCESS_DENIED

            # an upload beyond the capacity is refused and changes nothing
            with pytest.raises(VmferryError, match="larger than volume") as err:
                c.vol_upload("default", "base.raw", io.BytesIO(b"y" * (5 * MiB)))
            assert _code(err) == ErrorCode.INVALID_ARG
            out = io.BytesIO()
            c.vol_download("default", "base.raw", out)
            assert out.getvalue() == data

            # hostile names never reach a file
            for name in ("..", ".hidden", "a b", "x" * 200, "ok\nname", "..\\x"):
                with pytest.raises(VmferryError) as err:
                    c.vol_create("default", name, MiB)
                assert _code(err) == ErrorCode.INVALID_ARG, name
                with pytest.raises(VmferryError) as err:
                    c.vol_info("default", name)
                assert _code(err) in (ErrorCode.INVALID_ARG, ErrorCode.NO_SUPPORT), name
            for name in ("../../etc/passwd", "/etc/passwd"):
                with pytest.raises(VmferryError) as err:
                    c.vol_download("default", name, io.BytesIO())
                assert _code(err) in (ErrorCode.INVALID_ARG, ErrorCode.NO_SUPPORT), name
            with pytest.raises(VmferryError) as err:
                c.vol_create("default", "evil", MiB, "qcow2", "../../../etc/passwd", "raw")
            assert _code(err) == ErrorCode.INVALID_ARG
            with pytest.raises(VmferryError) as err:
                c.vol_list("nopool")
            assert _code(err) == ErrorCode.NO_STORAGE_POOL
            assert sorted(os.listdir(pool.path)) == ["base.raw", "top.qcow2"]

            # a volume the guest does not use any more goes
            c.vol_delete("default", "top.qcow2")
            c.vol_delete("default", "base.raw")
            assert c.vol_list("default") == []


def _qemu_uid() -> int:
    import pwd

    try:
        return pwd.getpwnam("vmferry-qemu").pw_uid
    except KeyError:
        return os.getuid()


def test_qemu_img_is_installed() -> None:
    assert subprocess.run(["qemu-img", "--version"], capture_output=True).returncode == 0


class SharedPoolHost(Host):
    """A daemon with a pool ``shared`` in a directory every such daemon names (an NFS pool)."""

    shared: ClassVar[Path | None] = None

    def config_text(self) -> str:
        text = super().config_text()
        return text + (f'[pools.shared]\npath = "{self.shared}"\n' if self.shared else "")


@needs_qemu
@pytest.mark.qemu
def test_guest_on_a_shared_pool_migrates_there_and_back(tmp: Path) -> None:
    """Each host resolves the volume in its own pool of that name (here: the same directory)."""
    SharedPoolHost.shared = tmp / "shared"
    try:
        with hosts(2, host_type=SharedPoolHost) as (a, b):
            with Client(a.uri) as ca, Client(b.uri) as cb:
                assert [p.name for p in cb.pool_list()] == ["shared"]
                ca.vol_create("shared", "base", 4 * MiB, "raw")
                ca.vol_create("shared", "top", 8 * MiB, "qcow2", "base", "raw")
                ca.create(_guest_with_disks("sg", _volume_disk("top", pool="shared")))
                hb = wait_heartbeat(ca, "sg")

                asyncio.run(_hop(a, b, "sg", p2p=False))
                assert [d.name for d in ca.list_domains(all=True)] == []
                hb2 = wait_heartbeat(cb, "sg", after=hb)
                check_continuity(hb, hb2)
                (disk,) = cb.domblklist("sg")
                assert disk.source == str(SharedPoolHost.shared / "top")

                asyncio.run(_hop(b, a, "sg", p2p=True))
                hb3 = wait_heartbeat(ca, "sg", after=hb2)
                check_continuity(hb2, hb3)
                (pid,) = a.qemu_pids()
                fds = os.listdir(f"/proc/{pid}/fd")
                held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
                assert {str(SharedPoolHost.shared / n) for n in ("top", "base")} <= held
    finally:
        SharedPoolHost.shared = None


async def _hop(src: Host, dst: Host, name: str, *, p2p: bool) -> None:
    async with AsyncClient(src.uri) as s, AsyncClient(dst.uri) as d:
        if p2p:
            await migrate_p2p(s, dst.uri, name, MigrateFlags.LIVE)
        else:
            await migrate(s, d, name, MigrateFlags.LIVE)


@pytest.fixture
def small_fs(tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (a pool that fills up); skipped where mounting is not allowed."""
    where = tmp / "small"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_pool_says_so(small_fs: Path) -> None:
    pool = Pool("small", small_fs / "pool")
    pool.ensure()
    with pytest.raises(VmferryError, match="bytes free") as err:
        pool.create_volume("big.raw", 64 * MiB, "raw")
    assert _code(err) == ErrorCode.STORAGE_FULL
    pool.create_volume("v.qcow2", 64 * MiB, "qcow2")  # sparse: metadata only
    before = pool.info("v.qcow2")
    up = pool.begin_upload("v.qcow2")
    with pytest.raises(VmferryError, match="the pool is full") as err:
        for _ in range(4):
            up.write(b"z" * MiB)
    assert _code(err) == ErrorCode.STORAGE_FULL
    up.abort()
    assert os.listdir(pool.path) == ["v.qcow2"]
    assert pool.info("v.qcow2") == before


def test_cli_storage_commands(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmferry.cli.main import main

    with hosts(1) as (h,):

        def run(*argv: str) -> tuple[int, str, str]:
            code = main(["-c", h.uri, *argv])
            out = capsys.readouterr()
            return code, out.out, out.err

        code, out, _ = run("pool-list")
        assert code == 0 and "default" in out and str(h.state_dir / "pools" / "default") in out
        assert run("vol-create-as", "default", "b", "2M")[1] == "Vol b created\n"
        assert run("vol-create-as", "default", "t", "1G", "--backing-vol", "b",
                   "--backing-vol-format", "raw")[1] == "Vol t created\n"  # fmt: skip
        code, out, _ = run("vol-info", "default", "t")
        assert "Format:         qcow2" in out and "Capacity:       1.000 GiB" in out
        assert "Backing:        b (raw)" in out
        code, out, _ = run("vol-list", "default", "--json")
        assert [v["name"] for v in json.loads(out)] == ["b", "t"]
        src, dst = tmp / "in.bin", tmp / "out.bin"
        src.write_bytes(_pattern(MiB + 17, 9))
        assert run("vol-upload", "default", "b", str(src))[0] == 0
        assert run("vol-download", "default", "b", str(dst))[0] == 0
        assert dst.read_bytes() == src.read_bytes()
        code, _, err = run("vol-create-as", "default", "../evil", "1M")
        assert code == 1 and "[invalid-arg]" in err and "invalid volume name" in err
        code, _, err = run("vol-upload", "default", "b", str(tmp / "missing"))
        assert code == 1 and "cannot open" in err
        assert run("vol-delete", "default", "t")[1] == "Vol t deleted\n"
