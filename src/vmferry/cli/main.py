"""``vmferry [-c URI] COMMAND ...``: the command line client of vmferryd, like virsh.

Exit status: 0 on success, 1 for an error (printed as ``error: MESSAGE [CODE]``),
2 for a usage error, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from vmferry import __version__
from vmferry.cli.commands import COMMANDS, GROUPS
from vmferry.cli.context import URI_ENV, Command, Context
from vmferry.client import PKI_DIR_ENV
from vmferry.errors import VmferryError

USAGE_ERROR = 2
INTERRUPTED = 130


def build_parser(commands: tuple[Command, ...] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of all *commands*; each subparser remembers its :class:`Command`."""
    parser = argparse.ArgumentParser(
        prog="vmferry", description="Manage QEMU domains and their live migration via vmferryd."
    )
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        help=f"vmferryd to talk to: unix:///path.sock, tls://host:port or tcp://host:port "
        f"(default ${URI_ENV})",
    )
    parser.add_argument(
        "--pki-dir",
        type=Path,
        metavar="DIR",
        help=f"TLS files for tls:// (default ${PKI_DIR_ENV}, else ~/.config/vmferry/pki)",
    )
    parser.add_argument("--version", action="version", version=f"vmferry {__version__}")
    top = parser.add_subparsers(metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}  # argparse's _SubParsersAction is private
    for command in commands:
        *group, leaf = command.name.split()
        where = top
        if group:
            (name,) = group
            if name not in groups:
                group_parser = top.add_parser(name, help=GROUPS.get(name))
                groups[name] = group_parser.add_subparsers(metavar="COMMAND", required=True)
            where = groups[name]
        sub = where.add_parser(leaf, help=command.help, description=command.help)
        for a in command.args:
            sub.add_argument(*a.flags, **a.options)
        if command.json:
            sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``vmferry`` command line; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USAGE_ERROR)
    command: Command = args.command
    uri = args.connect or os.environ.get(URI_ENV)
    if command.connect and not uri:
        parser.print_usage(sys.stderr)
        print(
            f"vmferry: error: no daemon to talk to: use -c URI or set ${URI_ENV} "
            "(e.g. unix:///run/vmferry/vmferryd.sock)",
            file=sys.stderr,
        )
        return USAGE_ERROR
    ctx = Context(uri, args.pki_dir)
    try:
        return command.run(ctx, args) or 0
    except VmferryError as err:
        print(err, file=sys.stderr)  # str() is "error: MESSAGE [CODE]"
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`vmferry list | head`): not an error worth a traceback.
        _silence_stdout()
        return 1
    finally:
        ctx.close()


def _silence_stdout() -> None:
    # Python flushes stdout at exit; that flush would raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
