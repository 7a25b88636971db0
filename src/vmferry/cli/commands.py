"""The commands of ``vmferry``: one small function each, registered in :data:`COMMANDS`.

They read the daemon's answers as JSON (``ctx.client.fetch``), so that none
of them imports pydantic, and import anything heavy inside the function that
needs it (docs/cli.md, "Adding a command").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from vmferry.cli import (
    cluster_cmds,
    cluster_evac_cmds,
    completion,
    migrate_cmds,
    observe_cmds,
    storage_cmds,
    verbs,
)
from vmferry.cli import format as fmt
from vmferry.cli.context import Command, Context, arg
from vmferry.client import calls
from vmferry.errors import ErrorCode, VmferryError

#: Seconds between two polls of ``console --follow``.
CONSOLE_POLL = 0.5

NAME = arg("name", metavar="NAME", help="domain name or UUID")
FILE = arg("file", metavar="FILE", help="domain XML file ('-' for stdin)")


def _read_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot read {path}: {why}") from exc


def _done(ctx: Context, dom: Mapping[str, Any], what: str) -> None:
    ctx.out(f"Domain '{dom['name']}' {what}")


def cmd_hostinfo(ctx: Context, args: argparse.Namespace) -> None:
    host = ctx.client.fetch(calls.host())
    ctx.out(fmt.to_json(host) if args.json else fmt.host_info(host))


def cmd_list(ctx: Context, args: argparse.Namespace) -> None:
    domains = ctx.client.fetch(calls.list_domains(all=args.all))
    if args.name:  # one name a line: for scripts and shell completion
        ctx.out("".join(f"{d['name']}\n" for d in domains), end="")
    else:
        ctx.out(fmt.to_json(domains) if args.json else fmt.domain_list(domains))


def cmd_define(ctx: Context, args: argparse.Namespace) -> None:
    dom = ctx.client.fetch(calls.define(_read_file(args.file)))
    _done(ctx, dom, f"defined from {args.file}")


def cmd_create(ctx: Context, args: argparse.Namespace) -> None:
    dom = ctx.client.fetch(calls.create(_read_file(args.file)))
    _done(ctx, dom, f"created from {args.file}")


def cmd_undefine(ctx: Context, args: argparse.Namespace) -> None:
    _done(ctx, ctx.client.fetch(calls.undefine(args.name)), "has been undefined")


def cmd_start(ctx: Context, args: argparse.Namespace) -> None:
    _done(ctx, ctx.client.fetch(calls.start(args.name)), "started")


def cmd_shutdown(ctx: Context, args: argparse.Namespace) -> None:
    dom = ctx.client.fetch(calls.shutdown(args.name, timeout=args.timeout))
    _done(ctx, dom, "has been shut down")


def cmd_destroy(ctx: Context, args: argparse.Namespace) -> None:
    _done(ctx, ctx.client.fetch(calls.destroy(args.name)), "destroyed")


def cmd_suspend(ctx: Context, args: argparse.Namespace) -> None:
    _done(ctx, ctx.client.fetch(calls.suspend(args.name)), "suspended")


def cmd_resume(ctx: Context, args: argparse.Namespace) -> None:
    _done(ctx, ctx.client.fetch(calls.resume(args.name)), "resumed")


def cmd_dominfo(ctx: Context, args: argparse.Namespace) -> None:
    dom = ctx.client.fetch(calls.dominfo(args.name))
    ctx.out(fmt.to_json(dom) if args.json else fmt.domain_info(dom))


def cmd_domstate(ctx: Context, args: argparse.Namespace) -> None:
    state = ctx.client.fetch(calls.domstate(args.name))
    ctx.out(fmt.to_json(state) if args.json else fmt.domain_state(state, reason=args.reason))


def cmd_dumpxml(ctx: Context, args: argparse.Namespace) -> None:
    xml = ctx.client.run(
        calls.dumpxml(args.name, migratable=args.migratable, inactive=args.inactive)
    )
    if args.json:
        ctx.out(fmt.to_json({"xml": xml}))
    else:
        ctx.out(xml, end="" if xml.endswith("\n") else "\n")


def cmd_console(ctx: Context, args: argparse.Namespace) -> None:
    import time

    offset = 0
    while True:
        chunk = ctx.client.fetch(calls.console(args.name, offset))
        if chunk["data"]:
            ctx.out(chunk["data"], end="")
        offset = int(chunk["next_offset"])
        if not args.follow:
            return
        time.sleep(CONSOLE_POLL)


def cmd_event(ctx: Context, args: argparse.Namespace) -> None:
    # Like virsh: one event unless --loop; --count bounds either.
    limit = args.count if args.count is not None else (None if args.loop else 1)
    seen = 0
    with ctx.client.events() as events:
        for event in events:
            if args.domain and args.domain not in (event.domain, event.uuid):
                continue
            if args.json:
                ctx.out(fmt.to_json(event, indent=None))
            else:
                ctx.out(fmt.event_line(event, timestamp=args.timestamp))
            seen += 1
            if limit is not None and seen >= limit:
                return
    raise VmferryError(
        ErrorCode.CONNECT_FAILED, f"vmferryd at {ctx.client.uri} ended the event stream"
    )


def cmd_pki_init(ctx: Context, args: argparse.Namespace) -> None:
    # Lazy: only this command needs cryptography.
    from pathlib import Path

    from vmferry.pki import init_pki

    directory = Path(args.dir)
    init_pki(directory, server_names=args.san, days=args.days, force=args.force)
    ctx.out(f"PKI created in {directory}: copy this directory to every host of the cluster")


def cmd_pki_client(ctx: Context, args: argparse.Namespace) -> None:
    from pathlib import Path

    from vmferry.pki import issue_client

    cert = issue_client(
        Path(args.dir), Path(args.out), args.name, read_only=args.read_only, days=args.days
    )
    role = "read-only" if args.read_only else "admin"
    ctx.out(f"{role} client certificate {cert}: give {args.out} to the user as their --pki-dir")


def cmd_pki_revoke(ctx: Context, args: argparse.Namespace) -> None:
    from pathlib import Path

    from vmferry.pki import CRL, revoke

    serial = revoke(Path(args.dir), Path(args.cert))
    ctx.out(
        f"revoked serial {serial:x} in {Path(args.dir) / CRL}: copy it to every host "
        "and restart the daemons"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


#: Help of command groups (the first word of a two-word command name).
GROUPS = {
    "pki": "manage the certificates of the mutual-TLS listeners",
    "cluster": "the hosts of the cluster and where each VM runs",
}

COMMANDS: tuple[Command, ...] = (
    Command("hostinfo", "show the daemon's host", cmd_hostinfo, json=True),
    Command(
        "list",
        "list domains",
        cmd_list,
        (
            arg("--all", action="store_true", help="also list inactive domains"),
            arg("--name", action="store_true", help="only the names, one a line"),
        ),
        json=True,
    ),
    Command("define", "define (but do not start) a domain from an XML file", cmd_define, (FILE,)),
    Command("undefine", "undefine a domain", cmd_undefine, (NAME,)),
    Command("create", "create and start a transient domain from an XML file", cmd_create, (FILE,)),
    Command("start", "start a defined, inactive domain", cmd_start, (NAME,)),
    Command(
        "shutdown",
        "shut a domain down gracefully and wait until it is off",
        cmd_shutdown,
        (
            NAME,
            arg(
                "--timeout",
                type=_seconds,
                default=60.0,
                metavar="S",
                help="seconds to wait for the guest to power off (default 60)",
            ),
        ),
    ),
    Command("destroy", "stop a domain at once", cmd_destroy, (NAME,)),
    Command("suspend", "pause a domain", cmd_suspend, (NAME,)),
    Command("resume", "resume a paused domain", cmd_resume, (NAME,)),
    Command("dominfo", "show domain information", cmd_dominfo, (NAME,), json=True),
    Command(
        "domstate",
        "show a domain's state",
        cmd_domstate,
        (NAME, arg("--reason", action="store_true", help="also show the reason")),
        json=True,
    ),
    Command(
        "dumpxml",
        "show a domain's XML",
        cmd_dumpxml,
        (
            NAME,
            arg("--migratable", action="store_true", help="XML suitable for migration"),
            arg("--inactive", action="store_true", help="the persistent definition"),
        ),
        json=True,
    ),
    Command(
        "console",
        "print a domain's captured serial console output",
        cmd_console,
        (NAME, arg("--follow", action="store_true", help="keep printing new output until Ctrl-C")),
    ),
    Command(
        "event",
        "print domain events (one unless --loop)",
        cmd_event,
        (
            arg("--loop", action="store_true", help="keep printing events until Ctrl-C"),
            arg("--domain", metavar="NAME", help="only events of this domain (name or UUID)"),
            arg("--count", type=_positive, metavar="N", help="stop after N events"),
            arg("--timestamp", action="store_true", help="prefix each event with its time"),
        ),
        json=True,
    ),
    *migrate_cmds.COMMANDS,
    *storage_cmds.COMMANDS,
    *observe_cmds.COMMANDS,
    *verbs.COMMANDS,
    *cluster_cmds.COMMANDS,
    *cluster_evac_cmds.COMMANDS,
    Command(
        "pki init",
        "create a CA and the server and client certificates in DIR",
        cmd_pki_init,
        (
            arg("dir", metavar="DIR"),
            arg(
                "--san",
                action="append",
                default=[],
                metavar="NAME",
                help="another host name or IP the daemons are reached by (repeatable)",
            ),
            arg("--days", type=_positive, default=3650, help="validity (default 3650)"),
            arg("--force", action="store_true", help="replace an existing CA"),
        ),
        connect=False,
    ),
    Command(
        "pki client",
        "issue a client certificate of the CA in DIR into a new directory OUT",
        cmd_pki_client,
        (
            arg("dir", metavar="DIR"),
            arg("out", metavar="OUT"),
            arg("name", metavar="NAME", help="the certificate's CN (who it is for)"),
            arg("--read-only", action="store_true", help="a certificate of the read-only role"),
            arg("--days", type=_positive, default=365, help="validity (default 365)"),
        ),
        connect=False,
    ),
    Command(
        "pki revoke",
        "revoke a certificate: add it to DIR/crl.pem",
        cmd_pki_revoke,
        (arg("dir", metavar="DIR"), arg("cert", metavar="CERT", help="the certificate (PEM)")),
        connect=False,
    ),
    *completion.COMMANDS,
)
