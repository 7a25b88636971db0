"""``vmferry cluster ...``: the hosts of the cluster and where each VM runs."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from vmferry.cli.context import Command, Context


def _gib(kib: int) -> str:
    return f"{kib / (1024 * 1024):.1f}" if kib else "-"


def cmd_cluster_list(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    info = ctx.client.cluster()
    if args.json:
        ctx.out(fmt.to_json(info))
        return
    now = time.time()
    rows = [("Host", "State", "URI", "Free GiB", "CPUs", "Seen", "VMs")]
    for h in info.hosts:
        seen = (
            "now" if h.self else (f"{max(0, now - h.last_seen):.0f}s ago" if h.last_seen else "-")
        )
        name = (h.name or "?") + (" *" if h.self else "")
        rows.append(
            (
                name,
                h.state + (" (maintenance)" if h.maintenance else ""),
                h.uri or "-",
                _gib(h.memory_free_kib),
                str(h.cpus or "-"),
                seen,
                str(len(h.vms)),
            )
        )
    ctx.out(_table(rows))
    ctx.out(f"\nLeases: {info.backend}")
    if info.vms:
        ctx.out(
            "\n"
            + _table(
                [("VM", "UUID", "State", "Host")]
                + [(v.name, v.uuid, v.state, v.host) for v in info.vms]
            )
        )


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


COMMANDS: tuple[Command, ...] = (
    Command(
        "cluster list",
        "list the cluster's hosts, their state, and where each VM runs",
        cmd_cluster_list,
        json=True,
    ),
)
