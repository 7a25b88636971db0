"""``vmferry [-c URI] COMMAND ...``: the command line client of vmferryd, like virsh.

Exit status: 0 on success, 1 for an error (printed as ``error: MESSAGE [CODE]``),
2 for a usage error, 130 after Ctrl-C.

Parsing is in two steps so that a command starts fast (issue 10): the global
options and the command's name first, then an ``argparse`` parser for that
one command only.  :func:`build_parser` builds all of them at once (tests,
shell completion); both use :func:`add_command_args`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, NoReturn

from vmferry import __version__
from vmferry.cli.commands import COMMANDS, GROUPS
from vmferry.cli.context import PKI_DIR_ENV, URI_ENV, Command, Context
from vmferry.errors import ErrorCode, VmferryError

USAGE_ERROR = 2
INTERRUPTED = 130
PROG = "vmferry"
DESCRIPTION = "Manage QEMU domains and their live migration via vmferryd."


_WIDTH: list[int] = []


def _width() -> int:
    # What argparse's default does, without importing shutil (and fnmatch, bz2...) for it.
    # Once per process: argparse makes a formatter for every argument it adds.
    if not _WIDTH:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            columns = 80
        _WIDTH.append(columns - 2)
    return _WIDTH[0]


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_width())


class _RawFormatter(argparse.RawDescriptionHelpFormatter):
    """For the listings of commands, laid out already."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_width())


def _add_globals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        help=f"vmferryd to talk to: unix:///path.sock, tls://host:port or tcp://host:port "
        f"(default ${URI_ENV})",
    )
    parser.add_argument(
        "--pki-dir",
        metavar="DIR",
        help=f"TLS files for tls:// (default ${PKI_DIR_ENV}, else ~/.config/vmferry/pki)",
    )
    parser.add_argument("--version", action="version", version=f"vmferry {__version__}")


def add_command_args(parser: argparse.ArgumentParser, command: Command) -> None:
    """*command*'s arguments (and ``--json``) on its own *parser*."""
    for a in command.args:
        parser.add_argument(*a.flags, **a.options)
    if command.json:
        parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(command=command)


def build_parser(commands: tuple[Command, ...] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of all *commands*; each subparser remembers its :class:`Command`."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    _add_globals(parser)
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
        add_command_args(sub, command)
    return parser


def _listing(entries: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in entries) + 2
    return "\n".join(f"  {name:<{width}}{text}" for name, text in entries)


def _top_parser(commands: tuple[Command, ...]) -> argparse.ArgumentParser:
    """Global options and the command's words (the rest is left to the command's parser)."""
    entries: list[tuple[str, str]] = []
    for command in commands:
        first = command.name.split()[0]
        if " " not in command.name:
            entries.append((first, command.help))
        elif all(name != first for name, _ in entries):
            entries.append((first, GROUPS.get(first, "")))
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [-h] [-c URI] [--pki-dir DIR] [--version] COMMAND ...",
        description=DESCRIPTION,
        epilog="commands:\n"
        + _listing(entries)
        + f"\n\n'{PROG} COMMAND --help' shows its options.",
        formatter_class=_RawFormatter,
    )
    _add_globals(parser)
    parser.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse(
    argv: list[str] | None, commands: tuple[Command, ...] = COMMANDS
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """
    Parse a command line, building the parser of its one command only.

    :raise SystemExit: For ``--help``, ``--version`` and usage errors, as argparse does.
    """
    top = _top_parser(commands)
    args = top.parse_args(argv)
    words: list[str] = args.words
    if not words or words[0].startswith("-"):
        top.error("the following arguments are required: COMMAND")
    by_name = {c.name: c for c in commands}
    command = by_name.get(words[0])
    rest = words[1:]
    if command is None:
        group = sorted(c.name.split()[1] for c in commands if c.name.split()[0] == words[0])
        if not group:
            names = ", ".join(sorted({c.name.split()[0] for c in commands}))
            top.error(f"argument COMMAND: invalid choice: '{words[0]}' (choose from {names})")
        sub = argparse.ArgumentParser(
            prog=f"{PROG} {words[0]}",
            usage=f"{PROG} {words[0]} [-h] COMMAND ...",
            description=GROUPS.get(words[0]),
            epilog="commands:\n" + _listing([(n, by_name[f"{words[0]} {n}"].help) for n in group]),
            formatter_class=_RawFormatter,
        )
        sub.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        inner: list[str] = sub.parse_args(rest).words
        if not inner or inner[0].startswith("-"):
            sub.error("the following arguments are required: COMMAND")
        command = by_name.get(f"{words[0]} {inner[0]}")
        if command is None:
            sub.error(
                f"argument COMMAND: invalid choice: '{inner[0]}' (choose from {', '.join(group)})"
            )
        rest = inner[1:]
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {command.name}", description=command.help, formatter_class=_Formatter
    )
    add_command_args(parser, command)
    del args.words
    return parser, parser.parse_args(rest, namespace=args)


def main(argv: list[str] | None = None) -> int:
    """
    Run one ``vmferry`` command line; return the exit status.

    Without *argv* (the ``vmferry`` program itself, ``sys.argv``) it ends the
    process once the command is done: output flushed, ``atexit`` handlers run,
    the connections closed; only the interpreter's teardown (freeing every
    module, a good part of a fast command's time) is skipped.
    """
    if argv is None:
        _end_process(_main(None))
    return _main(argv)


def _end_process(status: int) -> NoReturn:
    import atexit

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        status = status or 1
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    atexit._run_exitfuncs()  # logging's shutdown and the like, as a normal exit runs them
    os._exit(status)


def _main(argv: list[str] | None) -> int:
    try:
        parser, args = parse(argv)
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
    except (KeyError, TypeError) as exc:
        # An answer without what the command expects (a daemon of another version?).
        garbled = VmferryError(
            ErrorCode.INTERNAL_ERROR, f"unexpected answer from vmferryd at {uri}: {exc!r}"
        )
        print(garbled, file=sys.stderr)
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
