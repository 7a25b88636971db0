"""The storage commands of ``vmferry``, with virsh's names: pools, volumes, ``domblklist``.

Heavy modules (the client, pydantic, the formatters) are imported inside the
commands, so ``vmferry --help`` does not load them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Any

from vmferry.cli.context import Command, Context, arg
from vmferry.client import storage_calls as sc

# Answers are read as JSON (ctx.client.fetch): no pydantic model is imported (docs/cli.md).

# virsh's scaled integers: a bare number is bytes; k, M, G, T, P are powers of 1024
# (with or without "iB"), KB, MB, ... powers of 1000.
_SCALED = re.compile(r"(\d+)\s*(?:([kKmMgGtTpPeE])(iB|B)?|([bB]))?")
_POWERS = "kmgtpe"


def scaled_size(text: str) -> int:
    """``10G`` -> 10 GiB in bytes (virsh's ``vol-create-as`` CAPACITY)."""
    match = _SCALED.fullmatch(text.strip())
    if match is None or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid size '{text}': a positive number with an optional unit (k, M, G, T, "
            "KiB, MiB, ..., KB, MB, ...)"
        )
    value = int(match.group(1))
    unit, suffix = match.group(2), match.group(3)
    if unit:
        base = 1000 if suffix == "B" else 1024
        value *= base ** (_POWERS.index(unit.lower()) + 1)
    return value


def _size(value: int) -> str:
    from vmferry.cli.migrate_cmds import pretty_bytes

    return pretty_bytes(value)


def _backing(info: Mapping[str, Any]) -> str:
    return " <- ".join(f"{b['name']} ({b['format']})" for b in info.get("backing") or [])


def cmd_pool_list(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    pools = ctx.client.fetch(sc.pool_list())
    if args.json:
        ctx.out(fmt.to_json(pools))
        return
    rows = [
        (p["name"], p["path"], _size(p["capacity"]), _size(p["available"]), str(p["volumes"]))
        for p in pools
    ]
    ctx.out(fmt.table(("Name", "Path", "Capacity", "Available", "Volumes"), rows))


def cmd_vol_list(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    volumes = ctx.client.fetch(sc.vol_list(args.pool))
    if args.json:
        ctx.out(fmt.to_json(volumes))
        return
    rows = [(v["name"], v["path"], v["format"], _size(v["capacity"]), _backing(v)) for v in volumes]
    ctx.out(fmt.table(("Name", "Path", "Format", "Capacity", "Backing"), rows))


def cmd_vol_info(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    info = ctx.client.fetch(sc.vol_info(args.pool, args.vol))
    if args.json:
        ctx.out(fmt.to_json(info))
        return
    pairs: list[tuple[str, object]] = [
        ("Name", info["name"]),
        ("Type", "file"),
        ("Path", info["path"]),
        ("Format", info["format"]),
        ("Capacity", _size(info["capacity"])),
        ("Allocation", _size(info["allocation"])),
    ]
    if info.get("backing"):
        pairs.append(("Backing", _backing(info)))
    ctx.out(fmt.fields(pairs))


def cmd_vol_create_as(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.errors import ErrorCode, VmferryError

    if args.backing_vol_format and not args.backing_vol:
        raise VmferryError(ErrorCode.INVALID_ARG, "--backing-vol-format needs --backing-vol")
    fmt = args.format or ("qcow2" if args.backing_vol else "raw")
    ctx.client.fetch(
        sc.vol_create(
            args.pool, args.name, args.capacity, fmt, args.backing_vol, args.backing_vol_format
        )
    )
    ctx.out(f"Vol {args.name} created")


def cmd_vol_delete(ctx: Context, args: argparse.Namespace) -> None:
    ctx.client.fetch(sc.vol_delete(args.pool, args.vol))
    ctx.out(f"Vol {args.vol} deleted")


def cmd_vol_upload(ctx: Context, args: argparse.Namespace) -> None:
    with _open_local(args.file, "rb") as f:
        ctx.client.vol_upload(args.pool, args.vol, f)


def cmd_vol_download(ctx: Context, args: argparse.Namespace) -> None:
    with _open_local(args.file, "wb") as f:
        ctx.client.vol_download(args.pool, args.vol, f)


def _open_local(path: str, mode: str) -> Any:
    from vmferry.errors import ErrorCode, VmferryError

    try:
        return open(path, mode)
    except OSError as err:
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot open {path}: {err.strerror}") from err


def cmd_domblklist(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    disks = ctx.client.fetch(sc.domblklist(args.name))
    if args.json:
        ctx.out(fmt.to_json(disks))
        return

    def source(d: Any) -> str:
        where = d.get("source") or "-"
        return f"{where} ({d.get('pool')}/{d.get('volume')})" if d["type"] == "volume" else where

    if args.details:
        rows = [(d["type"], d["device"], d["target"], source(d)) for d in disks]
        ctx.out(fmt.table(("Type", "Device", "Target", "Source"), rows))
    else:
        ctx.out(fmt.table(("Target", "Source"), [(d["target"], source(d)) for d in disks]))


POOL = arg("pool", metavar="POOL", help="pool name")
VOL = arg("vol", metavar="VOL", help="volume name")
LOCAL_FILE = arg("file", metavar="FILE", help="file on this machine")
FORMATS = ("raw", "qcow2")

COMMANDS: tuple[Command, ...] = (
    Command("pool-list", "list the host's storage pools", cmd_pool_list, json=True),
    Command("vol-list", "list the volumes of a pool", cmd_vol_list, (POOL,), json=True),
    Command("vol-info", "show a volume", cmd_vol_info, (POOL, VOL), json=True),
    Command(
        "vol-create-as",
        "create a volume",
        cmd_vol_create_as,
        (
            POOL,
            arg("name", metavar="NAME", help="volume name (a plain file name)"),
            arg("capacity", type=scaled_size, metavar="CAPACITY", help="size, e.g. 10G"),
            arg("--format", choices=FORMATS, help="raw (default) or qcow2"),
            arg("--backing-vol", metavar="VOL", help="backing volume in the same pool (qcow2)"),
            arg("--backing-vol-format", choices=FORMATS, help="format of the backing volume"),
        ),
    ),
    Command("vol-delete", "delete a volume no defined domain uses", cmd_vol_delete, (POOL, VOL)),
    Command(
        "vol-upload",
        "replace a volume's content with a local file",
        cmd_vol_upload,
        (POOL, VOL, LOCAL_FILE),
    ),
    Command(
        "vol-download",
        "write a volume's content to a local file",
        cmd_vol_download,
        (POOL, VOL, LOCAL_FILE),
    ),
    Command(
        "domblklist",
        "list a domain's disks and their sources",
        cmd_domblklist,
        (
            arg("name", metavar="DOMAIN", help="domain name or UUID"),
            arg("--details", action="store_true", help="also the disk type and device"),
        ),
        json=True,
    ),
)
