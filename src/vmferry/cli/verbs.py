"""The virsh verbs beyond the life cycle: ``reboot``, ``reset``, ``autostart``, ``domstats``,
``domiflist``, ``vncdisplay``, ``setmaxmem`` and ``setmem``.

Heavy modules (the client, pydantic, the formatters) are imported inside the
functions: loading this table must stay cheap for every other command.
"""

from __future__ import annotations

import argparse
from typing import Any

from vmferry.cli.context import Command, Context, arg
from vmferry.client import verb_calls as vc

# Answers are read as JSON (ctx.client.fetch): no pydantic model is imported (docs/cli.md).

NAME = arg("name", metavar="NAME", help="domain name or UUID")

#: virsh domstats' group switches -> the daemon's group names.
STATS_GROUPS = {
    "state": "state",
    "cpu_total": "cpu-total",
    "balloon": "balloon",
    "vcpu": "vcpu",
    "interface": "interface",
    "block": "block",
    "migration": "migration",
}


def size_kib(text: str) -> int:
    """virsh's scaled integer (default KiB): ``524288``, ``512M``, ``512MiB``, ``1G``."""
    from vmferry.domain.units import MAX_MEMORY_KIB, scaled_kib

    kib = scaled_kib(text)
    if kib is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: a number with an optional unit (KiB default; "
            "b, k, KiB, KB, M, MiB, MB, G, GiB, GB, ...)"
        )
    if not 1 <= kib <= MAX_MEMORY_KIB:
        raise argparse.ArgumentTypeError(f"size {text!r} must be between 1 KiB and 1 PiB")
    return kib


def cmd_reboot(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(f"Domain '{ctx.client.fetch(vc.reboot(args.name))['name']}' is being rebooted")


def cmd_reset(ctx: Context, args: argparse.Namespace) -> None:
    ctx.out(f"Domain '{ctx.client.fetch(vc.reset(args.name))['name']}' was reset")


def cmd_autostart(ctx: Context, args: argparse.Namespace) -> None:
    dom = ctx.client.fetch(vc.autostart(args.name, not args.disable))
    ctx.out(f"Domain '{dom['name']}' {'unmarked' if args.disable else 'marked'} as autostarted")


def stats_text(stats: dict[str, dict[str, Any]]) -> str:
    """virsh domstats' layout: ``Domain: 'NAME'`` then ``  key=value`` lines, a blank line."""
    blocks = []
    for name, values in stats.items():
        lines = [f"Domain: '{name}'", *(f"  {k}={v}" for k, v in values.items())]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def cmd_domstats(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    groups = [group for option, group in STATS_GROUPS.items() if getattr(args, option)]
    stats = ctx.client.fetch(vc.domstats(args.names, groups))["domains"]
    ctx.out(fmt.to_json(stats) if args.json else stats_text(stats), end="\n" if args.json else "")


def cmd_domiflist(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    nics = ctx.client.fetch(vc.interfaces(args.name))
    if args.json:
        ctx.out(fmt.to_json(nics))
        return
    rows = [[n["interface"], n["type"], n["source"], n["model"], n["mac"]] for n in nics]
    ctx.out(fmt.table(["Interface", "Type", "Source", "Model", "MAC"], rows))


def cmd_vncdisplay(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli import format as fmt

    vnc = ctx.client.fetch(vc.vncdisplay(args.name))
    if args.json:
        ctx.out(fmt.to_json(vnc))
    else:  # virsh: HOST:DISPLAY, or :DISPLAY when it listens on every address
        host = "" if vnc["listen"] in ("0.0.0.0", "::") else vnc["listen"]
        host = f"[{host}]" if ":" in host else host
        ctx.out(f"{host}:{vnc['display']}")


def cmd_setmem(ctx: Context, args: argparse.Namespace) -> None:
    live, config = _scope(args)
    ctx.client.fetch(vc.set_memory(args.name, args.size, live=live, config=config))


def cmd_setmaxmem(ctx: Context, args: argparse.Namespace) -> None:
    live, config = _scope(args)
    ctx.client.fetch(vc.set_max_memory(args.name, args.size, live=live, config=config))


def _scope(args: argparse.Namespace) -> tuple[bool, bool]:
    """virsh's --live/--config/--current: --current (the default) is neither."""
    if args.current and (args.live or args.config):
        from vmferry.errors import ErrorCode, VmferryError

        raise VmferryError(
            ErrorCode.INVALID_ARG, "--current cannot be combined with --live or --config"
        )
    return args.live, args.config


_SCOPE = (
    arg("--config", action="store_true", help="change the persistent definition"),
    arg("--live", action="store_true", help="change the running domain"),
    arg(
        "--current",
        action="store_true",
        help="the running domain if it runs, else the definition (default)",
    ),
)
_SIZE = arg("size", metavar="SIZE", type=size_kib, help="KiB, or with a unit: 512M, 1GiB")

COMMANDS: tuple[Command, ...] = (
    Command("reboot", "ask the guest to reboot (ACPI power button)", cmd_reboot, (NAME,)),
    Command("reset", "reset the domain at once, like its reset button", cmd_reset, (NAME,)),
    Command(
        "autostart",
        "start a persistent domain when the daemon starts (once per host boot)",
        cmd_autostart,
        (NAME, arg("--disable", action="store_true", help="do not autostart it any more")),
    ),
    Command(
        "domstats",
        "show domain statistics (all domains unless NAMEs are given)",
        cmd_domstats,
        (
            arg("names", nargs="*", metavar="NAME", help="domain name or UUID"),
            arg("--state", action="store_true", help="state and reason"),
            arg("--cpu-total", action="store_true", help="CPU time of the QEMU process"),
            arg("--balloon", action="store_true", help="current and maximum memory"),
            arg("--vcpu", action="store_true", help="virtual CPUs"),
            arg("--interface", action="store_true", help="network interfaces"),
            arg("--block", action="store_true", help="disks: reads, writes, flushes"),
            arg("--migration", action="store_true", help="the running outgoing migration"),
        ),
        json=True,
    ),
    Command("domiflist", "list a domain's network interfaces", cmd_domiflist, (NAME,), json=True),
    Command(
        "vncdisplay",
        "show where the domain's VNC server listens",
        cmd_vncdisplay,
        (NAME,),
        json=True,
    ),
    Command(
        "setmem",
        "change the memory of a domain (the balloon's target; --config: <currentMemory>)",
        cmd_setmem,
        (NAME, _SIZE, *_SCOPE),
    ),
    Command(
        "setmaxmem",
        "change the maximum memory of a domain (of its definition: --config, or shut off)",
        cmd_setmaxmem,
        (NAME, _SIZE, *_SCOPE),
    ),
)
