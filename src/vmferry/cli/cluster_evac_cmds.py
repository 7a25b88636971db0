"""``vmferry evacuate`` and ``vmferry maintenance``: draining a host, closing it to new guests.

The drain runs in the host's own daemon; this command starts it and follows
it (Ctrl-C stops following, never the drain). Heavy imports stay inside the
functions: the CLI starts fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmferry.cli.context import Command, Context, arg

if TYPE_CHECKING:
    from vmferry.api.models import EvacuateRequest, EvacuationInfo, EvacuationMove
    from vmferry.client import Client

#: Seconds between two looks at a running evacuation.
FOLLOW_POLL = 1.0

HOST = arg("host", metavar="HOST", help="the host's name, as 'vmferry cluster list' shows it")


def host_client(ctx: Context, name: str) -> Client:
    """A client of host *name*: the connected daemon if it is that host, else its cluster URI."""
    from vmferry.errors import ErrorCode, VmferryError

    client = ctx.client
    if client.host().hostname == name:
        return client
    cluster = client.cluster()
    for h in cluster.hosts:
        if h.name == name and h.uri:
            return ctx.connect(h.uri)
    known = ", ".join(sorted(h.name for h in cluster.hosts if h.name)) or "none"
    raise VmferryError(
        ErrorCode.INVALID_ARG,
        f"no host {name!r} in the cluster of {ctx.uri} (known: {known}); "
        "see 'vmferry cluster list'",
    )


# -- maintenance ----------------------------------------------------------------------------


def cmd_maintenance(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    client = host_client(ctx, args.host)
    if args.state is None:
        info = client.maintenance()
    else:
        info = client.set_maintenance(args.state == "on", args.reason or "")
    if args.json:
        ctx.out(fmt.to_json(info))
        return
    if info.on:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.since))
        why = f": {info.reason}" if info.reason else ""
        ctx.out(f"Host '{args.host}' is in maintenance since {since}{why}")
    else:
        ctx.out(f"Host '{args.host}' is not in maintenance")


# -- evacuate -------------------------------------------------------------------------------


def _request(args: argparse.Namespace) -> EvacuateRequest:
    from vmferry.api.models import EvacuateRequest
    from vmferry.errors import ErrorCode, VmferryError

    to = [n.strip() for n in (args.to or "").split(",") if n.strip()]
    try:
        return EvacuateRequest(
            to=to,
            max_parallel=args.max_parallel,
            per_destination=args.per_destination,
            bandwidth_mib_s=args.bandwidth or 0,
            downtime_target_ms=args.downtime_target or 0,
            dry_run=bool(args.dry_run),
        )
    except ValueError as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"evacuate: {exc}") from None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def plan_table(info: EvacuationInfo) -> str:
    rows = [("#", "VM", "MiB", "Dirty MiB/s", "To", "MiB/s", "Start", "Takes", "Downtime")]
    for m in info.moves:
        if m.result == "skipped":
            continue
        rows.append(
            (
                str(m.order),
                m.name,
                str(m.memory_mib),
                f"{m.dirty_rate_mib_s:g}",
                m.dest,
                f"{m.bandwidth_mib_s:g}",
                f"{m.planned_start_s:.1f} s",
                f"{m.planned_s:.1f} s",
                _ms(m.predicted_downtime_ms) if m.predicted_downtime_ms is not None else "over",
            )
        )
    out = [
        f"Evacuation plan of {info.host}: {sum(1 for m in info.moves if m.dest)} guests, "
        f"up to {info.per_link} at once per link (one sends, the next sets up), "
        f"about {info.planned_s:.1f} s",
        "",
        _table(rows),
    ]
    skipped = [m for m in info.moves if m.result == "skipped"]
    if skipped:
        out += ["", "Not placed (they stay):"] + [f"  {m.name}: {m.error}" for m in skipped]
    over = [m.name for m in info.moves if m.dest and m.predicted_downtime_ms is None]
    if over:
        out += [
            "",
            f"Over the downtime target even alone on a link: {', '.join(over)} "
            "(the convergence policy throttles them or switches to post-copy)",
        ]
    return "\n".join(out)


def progress_line(m: EvacuationMove) -> str:
    if m.result == "running":
        width = 20
        done = int(m.progress * width)
        bar = "#" * done + "." * (width - done)
        state = f"[{bar}] {m.progress * 100:3.0f} %"
    else:
        state = m.result
    return f"{m.name:<20} -> {m.dest or '-':<12} {state}"


def result_table(info: EvacuationInfo) -> str:
    rows = [("VM", "Destination", "Wall time", "Downtime", "Result")]
    for m in sorted(info.moves, key=lambda m: (m.order == 0, m.order, m.name)):
        result = m.result if not m.error else f"{m.result}: {m.error}"
        rows.append((m.name, m.dest or "-", f"{m.wall_s:.1f} s", _ms(m.downtime_ms), result))
    took = (info.finished - info.started) if info.finished else 0.0
    return f"Evacuation of {info.host}: {took:.1f} s\n\n" + _table(rows)


def follow(ctx: Context, client: Client, *, tty: bool) -> EvacuationInfo:
    """Show each VM's progress and the ETA until the drain ends."""
    shown: dict[str, str] = {}
    drawn = 0
    while True:
        info: EvacuationInfo = client.evacuation()
        lines = [progress_line(m) for m in info.moves]
        eta = "-" if info.eta_s is None else f"{info.eta_s:.0f} s"
        lines.append(f"ETA {eta}")
        if tty:
            if drawn:
                sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
            ctx.out("\n".join(lines))
            drawn = len(lines)
        else:
            for m, line in zip(info.moves, lines, strict=False):
                key = f"{m.result}{int(m.progress * 10)}"
                if shown.get(m.name) != key:
                    shown[m.name] = key
                    ctx.out(line)
        if info.state != "running":
            return info
        time.sleep(FOLLOW_POLL)


def cmd_evacuate(ctx: Context, args: argparse.Namespace) -> int | None:
    from vmferry.cli import format as fmt

    client = host_client(ctx, args.host)
    if not args.follow:
        info = client.evacuate(_request(args))
        if args.dry_run:
            ctx.out(fmt.to_json(info) if args.json else plan_table(info))
            return None
        if not args.json:
            ctx.out(plan_table(info) + "\n")
    try:
        info = follow(ctx, client, tty=sys.stdout.isatty() and not args.json)
    except KeyboardInterrupt:
        sys.stderr.write(
            f"\nThe evacuation goes on in vmferryd on {args.host}; follow it again with "
            f"'vmferry evacuate {args.host} --follow'\n"
        )
        return 130
    ctx.out(fmt.to_json(info) if args.json else "\n" + result_table(info))
    return 1 if any(m.result in ("failed", "skipped") for m in info.moves) else None


def _table(rows: Sequence[Sequence[str]]) -> str:
    from vmferry.cli import format as fmt

    return fmt.table(rows[0], rows[1:])


COMMANDS: tuple[Command, ...] = (
    Command(
        "evacuate",
        "move every running domain off HOST (the drain runs in HOST's daemon)",
        cmd_evacuate,
        (
            HOST,
            arg("--to", metavar="HOST,...", help="destination hosts (default: every other up)"),
            arg("--max-parallel", type=int, default=2, metavar="N", help="migrations at once"),
            arg(
                "--per-destination",
                type=int,
                default=2,
                metavar="N",
                help="migrations at once into one destination (and on its link)",
            ),
            arg("--bandwidth", type=int, metavar="MiB/s", help="bandwidth of each link"),
            arg("--downtime-target", type=int, metavar="MS", help="every guest's downtime target"),
            arg("--dry-run", action="store_true", help="print the plan, move nothing"),
            arg("--follow", action="store_true", help="follow the running evacuation"),
        ),
        json=True,
    ),
    Command(
        "maintenance",
        "show, or turn on/off, maintenance of HOST (no incoming migration, no new domain)",
        cmd_maintenance,
        (
            HOST,
            arg("state", nargs="?", choices=("on", "off"), help="omit to show"),
            arg("--reason", metavar="TEXT", help="why (shown to refused callers)"),
        ),
        json=True,
    ),
)
