"""Storage pools and volumes: names, config, XML, the dir pool (with real qemu-img), argv."""

from __future__ import annotations

import json
import os
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.daemon.config import load_config
from vmferry.domain import parse_domain_xml
from vmferry.domain.xml import format_domain_xml
from vmferry.errors import ErrorCode, VmferryError
from vmferry.qemu.command import BlockLayer, QemuPaths, build_argv
from vmferry.storage import Pool, PoolConfig, Pools, check_volume_name, default_pool_path

VOLUME_DISK = (
    "<disk type='volume' device='disk'><driver name='qemu' type='qcow2' cache='none'/>"
    "<source pool='P' volume='top.qcow2'/><target dev='vda' bus='virtio'/></disk>"
)


def _domain(devices: str) -> str:
    return (
        "<domain type='qemu'><name>g</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>"
        f"<memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>{devices}"
        "<memballoon model='none'/></devices></domain>"
    )


@pytest.fixture
def pool(tmp: Path) -> Pool:
    p = Pool("P", tmp / "pool")
    p.ensure()
    return p


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "/etc/passwd", ".hidden", "a\0b", "x" * 129, "a b", "a,b", "é"],
)
def test_bad_volume_names_are_refused(pool: Pool, name: str) -> None:
    with pytest.raises(VmferryError) as err:
        pool.volume_path(name)
    assert err.value.code == ErrorCode.INVALID_ARG


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "\0/é", max_size=140))
def test_no_name_escapes_the_pool(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    root = tmp_path_factory.getbasetemp() / "hyp-pool"
    root.mkdir(exist_ok=True)
    pool = Pool("P", root)
    try:
        path = pool.volume_path(name)
    except VmferryError as err:
        assert err.code == ErrorCode.INVALID_ARG
        return
    assert os.path.dirname(os.path.realpath(path)) == str(pool.path)
    assert path.name == name and not name.startswith(".")


def test_symlink_out_of_the_pool_is_refused(pool: Pool, tmp: Path) -> None:
    (tmp / "secret").write_text("x")
    (pool.path / "link").symlink_to(tmp / "secret")
    with pytest.raises(VmferryError, match="outside the pool"):
        pool.volume_path("link")
    assert check_volume_name("ok-name_1.qcow2") == "ok-name_1.qcow2"


# -- config ----------------------------------------------------------------------------------


def test_pools_config(tmp: Path) -> None:
    cfg = tmp / "d.toml"
    cfg.write_text('[pools.fast]\npath = "/srv/fast"\n[pools.rel]\npath = "images"\n')
    config = load_config(cfg)
    assert config.pools == {
        "fast": PoolConfig("fast", Path("/srv/fast")),
        "rel": PoolConfig("rel", tmp / "images"),
    }
    assert load_config(None).pools == {}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[pools.a]\npath = "/x"\nsize = 1\n', "unknown key pools.a.size"),
        ("[pools.a]\n", "needs path"),
        ('[pools]\npath = "/x"\n', "must be a table"),
        ('[pools."../x"]\npath = "/x"\n', "invalid pool name"),
        ('[pools.a]\npath = "/x"\n[pools.b]\npath = "/x/y"\n', "overlap"),
        ("[pools.a]\npath = 3\n", "path string"),
    ],
)
def test_pools_config_errors(tmp: Path, text: str, words: str) -> None:
    cfg = tmp / "d.toml"
    cfg.write_text(text)
    with pytest.raises(VmferryError, match=words) as err:
        load_config(cfg)
    assert err.value.code == ErrorCode.INVALID_ARG


def test_default_pool_lives_in_the_state_dir(tmp: Path) -> None:
    pools = Pools.from_config([], state_root=tmp / "s1")
    other = Pools.from_config([], state_root=tmp / "s2")
    assert [p.name for p in pools] == ["default"]
    assert pools.get("default").path == default_pool_path(tmp / "s1")
    assert pools.paths() != other.paths()
    with pytest.raises(VmferryError) as err:
        pools.get("nope")
    assert err.value.code == ErrorCode.NO_STORAGE_POOL


# -- XML -------------------------------------------------------------------------------------


def test_volume_disk_round_trip() -> None:
    d = parse_domain_xml(_domain(VOLUME_DISK))
    disk = d.devices.disks[0]
    assert (disk.type, disk.source_pool, disk.source_volume, disk.cache) == (
        "volume",
        "P",
        "top.qcow2",
        "none",
    )
    again = parse_domain_xml(format_domain_xml(d))
    assert again == d


@pytest.mark.parametrize(
    "source",
    ["<source pool='P'/>", "<source pool='P' volume='../x'/>", "<source pool='a/b' volume='v'/>"],
)
def test_volume_disk_bad_sources(source: str) -> None:
    xml = _domain(
        f"<disk type='volume'>{source}<target dev='vda'/></disk>",
    )
    with pytest.raises(VmferryError) as err:
        parse_domain_xml(xml)
    assert err.value.code == ErrorCode.XML_ERROR


# -- the dir pool, with qemu-img ---------------------------------------------------------------


def test_create_info_list_delete(pool: Pool) -> None:
    base = pool.create_volume("base.raw", 1 << 20, "raw")
    assert (base.format, base.capacity, base.backing) == ("raw", 1 << 20, ())
    top = pool.create_volume("top.qcow2", 2 << 20, "qcow2", backing=("base.raw", "raw"))
    assert (top.format, top.capacity, top.backing) == ("qcow2", 2 << 20, (("base.raw", "raw"),))
    mid = pool.create_volume("t2", 2 << 20, "qcow2", backing=("top.qcow2", "qcow2"))
    assert mid.backing == (("top.qcow2", "qcow2"), ("base.raw", "raw"))
    assert [v.name for v in pool.list()] == ["base.raw", "t2", "top.qcow2"]
    assert os.stat(pool.volume_path("t2")).st_mode & 0o777 == 0o600
    with pytest.raises(VmferryError) as err:
        pool.create_volume("t2", 1 << 20)
    assert err.value.code == ErrorCode.STORAGE_VOL_EXISTS
    pool.delete_volume("t2")
    with pytest.raises(VmferryError) as err:
        pool.info("t2")
    assert err.value.code == ErrorCode.NO_STORAGE_VOL
    assert pool.free_bytes() > 0
    assert not [f for f in os.listdir(pool.path) if f.startswith(".")]


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"fmt": "vmdk"}, ErrorCode.INVALID_ARG),
        ({"capacity_bytes": 0}, ErrorCode.INVALID_ARG),
        ({"fmt": "raw", "backing": ("base.raw", "raw")}, ErrorCode.INVALID_ARG),
        ({"fmt": "qcow2", "backing": ("missing", "raw")}, ErrorCode.NO_STORAGE_VOL),
    ],
)
def test_create_refusals(pool: Pool, kwargs: dict[str, object], code: ErrorCode) -> None:
    pool.create_volume("base.raw", 1 << 20, "raw")
    args: dict[str, object] = {"name": "new", "capacity_bytes": 1 << 20, **kwargs}
    with pytest.raises(VmferryError) as err:
        pool.create_volume(**args)  # type: ignore[arg-type]
    assert err.value.code == code
    assert not pool.volume_path("new").exists()


def test_backing_outside_the_pool_is_refused(pool: Pool, tmp: Path) -> None:
    outside = tmp / "outside.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(outside), "1M"], check=True)
    evil = pool.path / "evil"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(outside), str(evil)],
        check=True,
    )
    with pytest.raises(VmferryError, match="not a volume of pool") as err:
        pool.chain("evil", "qcow2")
    assert err.value.code == ErrorCode.ACCESS_DENIED


def test_upload_and_download(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20, "raw")
    up = pool.begin_upload("v")
    up.write(b"x" * 4096)
    with pytest.raises(VmferryError, match="larger than volume"):
        up.write(b"y" * (1 << 20))
    info = up.commit()
    assert info.capacity == 4096
    f, size = pool.open_download("v")
    with f:
        assert (f.read(), size) == (b"x" * 4096, 4096)


def test_upload_of_an_image_leaving_the_pool_is_refused(pool: Pool, tmp: Path) -> None:
    pool.create_volume("v", 1 << 20, "qcow2")
    evil = tmp / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(evil)],
        check=True,
    )
    up = pool.begin_upload("v")
    up.write(evil.read_bytes())
    with pytest.raises(VmferryError, match="uploaded image refused"):
        up.commit()
    assert pool.info("v").backing == ()
    assert not [f for f in os.listdir(pool.path) if f.startswith(".")]


# -- QEMU's command line ---------------------------------------------------------------------


def test_chain_gets_one_node_per_layer() -> None:
    d = parse_domain_xml(_domain(VOLUME_DISK))
    chains = {"vda": [BlockLayer("/p/top.qcow2", "qcow2"), BlockLayer("/p/base.raw", "raw")]}
    argv = build_argv(d, QemuPaths(Path("/q"), Path("/c")), chains=chains)
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert [n["node-name"] for n in nodes] == ["file-vda-b1", "fmt-vda-b1", "file-vda", "fmt-vda"]
    assert nodes[1]["driver"] == "raw" and nodes[1]["read-only"] is True
    assert "backing" not in nodes[1]
    assert nodes[3]["backing"] == "fmt-vda-b1" and nodes[3]["driver"] == "qcow2"
    assert nodes[0]["filename"] == "/p/base.raw"
    assert all(n["cache"] == {"direct": True, "no-flush": False} for n in nodes)
    assert "virtio-blk-pci,drive=fmt-vda,write-cache=on,id=virtio-disk0" in argv


def test_unresolved_volume_is_refused() -> None:
    d = parse_domain_xml(_domain(VOLUME_DISK))
    with pytest.raises(VmferryError, match="not resolved") as err:
        build_argv(d, QemuPaths(Path("/q"), Path("/c")))
    assert err.value.code == ErrorCode.CONFIG_UNSUPPORTED


def test_pools_resolve(pool: Pool) -> None:
    pool.create_volume("base.raw", 1 << 20, "raw")
    pool.create_volume("top.qcow2", 1 << 20, "qcow2", backing=("base.raw", "raw"))
    pools = Pools([pool])
    d = parse_domain_xml(_domain(VOLUME_DISK))
    assert pools.resolve(d) == {
        "vda": [
            BlockLayer(str(pool.path / "top.qcow2"), "qcow2"),
            BlockLayer(str(pool.path / "base.raw"), "raw"),
        ]
    }
    pool.delete_volume("base.raw")
    with pytest.raises(VmferryError, match="disk 'vda'") as err:
        pools.resolve(d)
    assert err.value.code == ErrorCode.NO_STORAGE_VOL


# -- file disks, the daemon's pools, CLI, permissions -------------------------------------------


def test_file_disk_backing_must_stay_below_a_root(tmp: Path) -> None:
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    img = ["qemu-img", "create", "-q", "-f"]
    subprocess.run([*img, "raw", str(outside / "b.raw"), "1M"], check=True)
    subprocess.run([*img, "raw", str(root / "b.raw"), "1M"], check=True)
    for base, name in ((outside / "b.raw", "evil"), (root / "b.raw", "good")):
        subprocess.run(
            [*img, "qcow2", "-F", "raw", "-b", str(base), str(root / f"{name}.qcow2")], check=True
        )
    pools = Pools.from_config([], state_root=tmp / "state", roots=[root])

    def xml(name: str) -> str:
        return _domain(
            f"<disk type='file'><driver name='qemu' type='qcow2'/><source file='{root}/{name}'/>"
            "<target dev='vdb'/></disk>"
        )

    assert pools.resolve(parse_domain_xml(xml("good.qcow2"))) == {
        "vdb": [
            BlockLayer(str(root / "good.qcow2"), "qcow2"),
            BlockLayer(str(root / "b.raw"), "raw"),
        ]
    }
    with pytest.raises(VmferryError, match="not below an allowed directory") as err:
        pools.resolve(parse_domain_xml(xml("evil.qcow2")))
    assert err.value.code == ErrorCode.ACCESS_DENIED


@pytest.mark.parametrize(
    ("where", "ok"),
    [
        ("state/pools/x", True),
        ("elsewhere", True),
        ("state", False),
        ("state/qemu", False),
        (".", False),  # holds the state dir
        ("pki", False),
        ("pki/sub", False),
    ],
)
def test_pools_may_not_overlap_the_daemons_files(tmp: Path, where: str, ok: bool) -> None:
    from vmferry.daemon.config import DaemonConfig
    from vmferry.daemon.main import storage_pools
    from vmferry.daemon.state import StateDir

    config = DaemonConfig()
    config.pools = {"p": PoolConfig("p", tmp / where)}
    state = StateDir(tmp / "state")
    if ok:
        assert [p.path for p in storage_pools(config, state, [tmp / "pki", None])] == [
            Path(os.path.realpath(tmp / where))
        ]
    else:
        with pytest.raises(VmferryError, match="overlaps the daemon's own files") as err:
            storage_pools(config, state, [tmp / "pki", None])
        assert err.value.code == ErrorCode.INVALID_ARG


def test_ensure_removes_what_a_crash_left(pool: Pool) -> None:
    pool.create_volume("v", 1 << 20)
    (pool.path / ".create-x.0123").write_text("half")
    (pool.path / ".upload-v.4567").write_text("half")
    (pool.path / ".keep").write_text("not ours")
    pool.ensure()
    assert sorted(os.listdir(pool.path)) == [".keep", "v"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("512", 512), ("1k", 1024), ("10M", 10 << 20), ("2GiB", 2 << 30), ("1GB", 10**9), ("3b", 3)],
)
def test_capacity_is_a_virsh_scaled_integer(text: str, value: int) -> None:
    from vmferry.cli.storage_cmds import scaled_size

    assert scaled_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "1X", "1.5G", "G"])
def test_bad_capacities(text: str) -> None:
    import argparse

    from vmferry.cli.storage_cmds import scaled_size

    with pytest.raises(argparse.ArgumentTypeError):
        scaled_size(text)


def test_storage_commands_are_registered() -> None:
    from vmferry.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["vol-create-as", "default", "v", "1G", "--format", "qcow2", "--backing-vol", "b"]
    )
    assert (args.pool, args.name, args.capacity, args.format, args.backing_vol) == (
        "default",
        "v",
        1 << 30,
        "qcow2",
        "b",
    )
    for argv in (["pool-list"], ["vol-list", "p"], ["vol-info", "p", "v"], ["domblklist", "d"]):
        assert parser.parse_args(argv).json is False
    for argv in (["vol-delete", "p", "v"], ["vol-upload", "p", "v", "f"]):
        parser.parse_args(argv)


def test_download_is_admin_only_by_default() -> None:
    from vmferry.daemon.access import PERMISSIONS, READ_ONLY_DEFAULT
    from vmferry.daemon.config import AccessConfig

    data = ("GET", "/v1/pools/{pool}/volumes/{volume}/data")
    assert PERMISSIONS[data] == "storage.download"
    assert "storage.download" not in READ_ONLY_DEFAULT
    assert "storage.read" in READ_ONLY_DEFAULT
    assert list(READ_ONLY_DEFAULT) == AccessConfig().readonly_permissions


# -- header cache ------------------------------------------------------------------------------


def test_chain_headers_are_read_again_once_the_file_changed(
    pool: Pool, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start reads no header of an unchanged image, but any change makes it read again."""
    from vmferry.storage import qemuimg

    pool.create_volume("base.raw", 1 << 20, "raw")
    pool.create_volume("top.qcow2", 1 << 20, "qcow2")  # remembered: as qemu-img made it
    reads: list[str] = []
    real_info = qemuimg.info

    def info(path: str, fmt: str) -> dict[str, object]:
        reads.append(os.path.basename(path))
        return real_info(path, fmt)

    monkeypatch.setattr(qemuimg, "info", info)
    assert [x.name for x in pool.chain("top.qcow2", "qcow2")] == ["top.qcow2"]
    assert reads == []
    # The header now names a backing file outside the pool: the next walk must see it.
    outside = tmp / "outside.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(outside), "1M"], check=True)
    top = str(pool.path / "top.qcow2")
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", str(outside), top], check=True)
    with pytest.raises(VmferryError, match="not a volume of pool"):
        pool.chain("top.qcow2", "qcow2")
    assert reads == ["top.qcow2"]
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", "base.raw", top], check=True)
    assert [x.name for x in pool.chain("top.qcow2", "qcow2")] == ["top.qcow2", "base.raw"]
    assert [x.name for x in pool.chain("top.qcow2", "qcow2")] == ["top.qcow2", "base.raw"]
    # base.raw was remembered at its creation; the second walk read nothing
    assert reads == ["top.qcow2", "top.qcow2"]
