"""The migration commands of ``vmferry``: ``migrate``, ``domjobinfo``, ``domjobabort`` and tuning.

Names, flags and meanings follow virsh.  ``migrate`` runs the protocol from
here (client-managed) against the source (``-c URI``) and the destination
(``DESTURI``), or with ``--p2p`` asks the source daemon to do it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from vmferry.cli import format as fmt
from vmferry.cli.context import Arg, Command, Context, arg
from vmferry.client import migration_calls as mc
from vmferry.errors import ErrorCode, VmferryError

if TYPE_CHECKING:
    from vmferry.cli.progress import View
    from vmferry.client.migrate import MigrationReport
    from vmferry.migration.flags import MigrateFlags
    from vmferry.migration.params import MigrationParams

# Imports are lazy (in the functions): `vmferry --help` and the other commands load
# this module for its table only (docs/cli.md).

#: Seconds to wait for the source to accept a domjobabort after Ctrl-C.
ABORT_WAIT_S = 5.0

NAME = arg("name", metavar="NAME", help="domain name or UUID")

# --flag -> MigrateFlags member name, for the plain switches of `migrate`.
_SWITCHES = {
    "live": "LIVE",
    "offline": "OFFLINE",
    "p2p": "PEER2PEER",
    "persistent": "PERSIST_DEST",
    "undefinesource": "UNDEFINE_SOURCE",
    "suspend": "PAUSED",
    "auto_converge": "AUTO_CONVERGE",
    "compressed": "COMPRESSED",
    "postcopy": "POSTCOPY",
    "postcopy_resume": "POSTCOPY_RESUME",
    "tls": "TLS",
    "tunnelled": "TUNNELLED",
    "copy_storage_all": "NON_SHARED_DISK",
    "copy_storage_inc": "NON_SHARED_INC",
    "copy_storage_synchronous_writes": "NON_SHARED_SYNCHRONOUS_WRITES",
}


def _read_xml(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise VmferryError(ErrorCode.INVALID_ARG, f"cannot read {path}: {why}") from exc


def migration_request(args: argparse.Namespace) -> tuple[MigrateFlags, MigrationParams]:
    """
    The flags and parameters that ``vmferry migrate``'s options mean.

    Without ``--live`` and ``--offline`` the migration is virsh's default:
    not live, the guest paused while its memory moves.

    :raise VmferryError: ``INVALID_ARG`` for options that do not go together
        or an unreadable ``--xml`` file.
    """
    from vmferry.migration.flags import MigrateFlags
    from vmferry.migration.params import MigrationParams

    flags = MigrateFlags(0)
    for option, flag in _SWITCHES.items():
        if getattr(args, option):
            flags |= MigrateFlags[flag]
    params = MigrationParams(
        bandwidth_mib_s=args.bandwidth or 0,
        migrate_uri=args.migrateuri or "",
        listen_address=args.listen_address or "",
        dname=args.dname or "",
        postcopy_bandwidth_mib_s=args.postcopy_bandwidth or 0,
        postcopy_after_precopy=bool(args.postcopy_after_precopy),
        postcopy_autoresume=not args.no_postcopy_autoresume,
        migrate_disks=args.migrate_disks or "",
    )
    if args.parallel is not None:
        flags |= MigrateFlags.PARALLEL
        params.parallel_connections = args.parallel
    if args.comp_methods:
        flags |= MigrateFlags.COMPRESSED
        params.compression = args.comp_methods
    if flags & MigrateFlags.TUNNELLED and not flags & MigrateFlags.PEER2PEER:
        raise VmferryError(ErrorCode.INVALID_ARG, "--tunnelled requires --p2p (as in virsh)")
    if args.timeout is not None:
        # virsh: the timeout suspends a live guest that does not converge.
        if not flags & MigrateFlags.LIVE:
            raise VmferryError(ErrorCode.INVALID_ARG, "--timeout requires --live")
        params.timeout_suspend_s = float(args.timeout)
    if args.v2 and args.p2p:
        raise VmferryError(
            ErrorCode.INVALID_ARG,
            "--v2 cannot be used with --p2p: the source daemon chooses the protocol",
        )
    if args.xml:
        params.dest_xml = _read_xml(args.xml)
    if args.policy:
        params.policy = _policy_ref(args.policy)
    params.downtime_target_ms = args.downtime_target or 0
    params.deadline_s = float(args.deadline or 0)
    if (params.policy or params.deadline_s or params.downtime_target_ms) and not (
        flags & MigrateFlags.LIVE
    ):
        raise VmferryError(
            ErrorCode.INVALID_ARG, "--policy, --downtime-target and --deadline require --live"
        )
    params.validate(flags)
    return flags, params


def _policy_ref(text: str) -> str:
    """``--policy``: a built-in name as is; a file (a path, or ``*.toml``) becomes its TOML text."""
    import os.path

    if "/" in text or text.endswith(".toml") or os.path.isfile(text):
        return _read_xml(text)
    return text


# -- migrate --------------------------------------------------------------------------------


def _ms(stats: Mapping[str, Any], key: str) -> str:
    value = stats.get(key)
    return "-" if value is None else f"{int(value)} ms"


def summary(report: MigrationReport) -> str:
    """What ``migrate`` prints at the end: virsh's 100 % line and what it cost."""
    stats = report.stats
    steps = ", ".join(f"{step} {seconds * 1000:.0f} ms" for step, seconds in report.steps.items())
    moved: Any = stats.get("data_processed")
    pairs: list[tuple[str, object]] = [
        ("Wall time", f"{report.wall_s:.2f} s"),
        ("QEMU time", _ms(stats, "total_time_ms")),
        ("Downtime", _ms(stats, "downtime_ms")),
    ]
    if stats.get("guest_downtime_ms") is not None:  # v3: the daemons measured the guest's pause
        pairs.insert(3, ("Guest downtime", _ms(stats, "guest_downtime_ms")))
    pairs.append(("Data moved", "-" if moved is None else pretty_bytes(int(moved))))
    if steps:
        pairs.append(("Steps", steps))
    return "Migration: [100 %]\n" + fmt.fields(pairs)


def report_json(report: MigrationReport, name: str, source: str, dest: str, p2p: bool) -> str:
    return fmt.to_json(
        {
            "domain": name,
            "source": source,
            "destination": dest,
            "p2p": p2p,
            "wall_s": report.wall_s,
            "steps": report.steps,
            "stats": report.stats,
            "migration_id": report.migration_id,
        }
    )


def _migrate(
    ctx: Context, args: argparse.Namespace, flags: MigrateFlags, params: MigrationParams, view: View
) -> MigrationReport:
    # The blocking client and no event loop: asyncio's import alone is a good part of
    # the process's start (issue 10); the protocol's steps are the same.
    from vmferry.cli.progress import NoProgress
    from vmferry.client import migrate_blocking as mb

    src = ctx.client
    poll = type(view) is not NoProgress  # a view that shows the job's figures
    try:
        if args.p2p:
            return mb.migrate_p2p(
                src, args.desturi, args.name, flags, params, progress=view, poll=poll
            )
        version = 2 if args.v2 else None
        dst = ctx.connect(args.desturi)
        return mb.migrate(
            src, dst, args.name, flags, params, version=version, progress=view, poll=poll
        )
    except KeyboardInterrupt:
        # Ctrl-C: like virsh, abort the job rather than leave it running unwatched.
        with contextlib.suppress(VmferryError):
            src.fetch(mc.jobabort(args.name), request_timeout=ABORT_WAIT_S)
        raise


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> None:
    from vmferry.cli.progress import open_view
    from vmferry.logs import new_migration_id

    flags, params = migration_request(args)
    if not ctx.uri:
        raise VmferryError(ErrorCode.INVALID_ARG, "no source vmferryd: use -c URI")
    # Made here so that the view can show it before the first step: grep it in both daemons' logs.
    params.migration_id = new_migration_id()
    # --json keeps stdout for exactly one document: progress goes to stderr then.
    stream = sys.stderr if args.json else sys.stdout
    with open_view(stream, verbose=args.verbose) as view:
        view.start(params.migration_id)
        report = _migrate(ctx, args, flags, params, view)
        view.finish(report.stats)
    if args.json:
        ctx.out(report_json(report, args.name, ctx.uri, args.desturi, bool(args.p2p)))
    else:
        ctx.out(summary(report))


# -- domjobinfo -----------------------------------------------------------------------------


def pretty_bytes(value: int) -> str:
    """virsh's capacity: the largest binary unit that keeps the number >= 1, three decimals."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{value} B" if unit == "B" else f"{size:.3f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# (stats key, label, how to show the value), in virsh's order.
_JOB_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("time_elapsed_ms", "Time elapsed", "ms"),
    ("data_processed", "Data processed", "bytes"),
    ("data_remaining", "Data remaining", "bytes"),
    ("data_total", "Data total", "bytes"),
    ("disk_processed", "File processed", "bytes"),  # virsh's names for the disks' part
    ("disk_remaining", "File remaining", "bytes"),
    ("disk_total", "File total", "bytes"),
    ("disk_bps", "File bandwidth", "bps"),
    ("memory_bps", "Memory bandwidth", "bps"),
    ("memory_dirty_rate", "Dirty rate", "pages/s"),
    ("memory_page_size", "Page size", "bytes"),
    ("memory_iteration", "Iteration", ""),
    ("auto_converge_throttle", "Auto converge throttle", "%"),
    ("setup_time_ms", "Setup time", "ms"),
    ("expected_downtime_ms", "Expected downtime", "ms"),
    ("downtime_ms", "Downtime", "ms"),
    ("guest_downtime_ms", "Guest downtime", "ms"),
    ("total_time_ms", "Total time", "ms"),
    ("policy", "Policy", ""),
    ("policy_contract", "Contract", ""),
    ("policy_downtime_target_ms", "Downtime target", "ms"),
    ("policy_deadline_s", "Deadline", "s"),
    ("policy_deadline_auto", "Deadline automatic", "yes/no"),
    ("policy_deadline_left_s", "Deadline left", "s"),
    ("policy_converges", "Converges", "yes/no"),
    ("policy_expected_downtime_ms", "Predicted downtime", "ms"),
    ("policy_eta_s", "ETA", "s"),
    ("policy_needed_downtime_ms", "Needed downtime", "ms"),
    ("policy_choice", "Policy choice", ""),
)


def _job_value(value: Any, unit: str) -> str:
    if unit == "bytes":
        return pretty_bytes(int(value))
    if unit == "bps":
        return pretty_bytes(int(value)) + "/s"
    if unit in ("ms", "pages/s"):
        return f"{int(value):<12} {unit}"
    if unit == "%":
        return f"{int(value)} %"
    if unit == "s":
        return f"{float(value):<12g} s"
    if unit == "yes/no":
        return "yes" if value else "no"
    return str(value)


def _job_lines(pairs: Iterable[tuple[str, str]]) -> str:
    pairs = list(pairs)
    width = max(len(label) for label, _ in pairs) + 2
    return "\n".join(f"{label + ':':<{width}}{value}".rstrip() for label, value in pairs)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def job_info(job: Mapping[str, Any]) -> str:
    """``virsh domjobinfo``'s layout for a job (``GET .../jobinfo``: docs/api.md; or JobStats)."""
    from vmferry.cli.progress import policy_action

    job = fmt.plain(job)
    kind = str(job.get("type") or "none")
    stats: Mapping[str, Any] = job.get("stats") or {}
    pairs = [("Job type", _capitalized(kind))]
    if kind == "none" and not stats:
        return _job_lines(pairs)
    if stats.get("migration_id"):
        pairs.append(("Migration id", str(stats["migration_id"])))
    if job.get("operation"):
        pairs.append(("Operation", _capitalized(str(job["operation"]))))
    phase = job.get("phase")
    if phase and phase != "none":
        pairs.append(("Phase", str(phase)))
    for key, label, unit in _JOB_FIELDS:
        if stats.get(key) is not None:
            pairs.append((label, _job_value(stats[key], unit)))
    for key, label in _PHASES:
        phases = stats.get(key)
        if isinstance(phases, Mapping) and phases:
            pairs.append((label, _phase_times(phases)))
    for action in stats.get("policy_actions") or []:
        pairs.append(("Policy action", policy_action(action)))
    if stats.get("error"):
        pairs.append(("Error message", str(stats["error"])))
    return _job_lines(pairs)


# Each side's step times (vmferry.daemon.observe), in the completed job's statistics.
_PHASES = (("source_phases_ms", "Source steps"), ("destination_phases_ms", "Destination steps"))


def _phase_times(phases: Mapping[str, Any]) -> str:
    """``begin 12 ms, perform 840 ms, confirm 31 ms``."""
    return ", ".join(f"{step} {float(ms):.0f} ms" for step, ms in phases.items())


def cmd_domjobinfo(ctx: Context, args: argparse.Namespace) -> None:
    job = ctx.client.fetch(mc.jobinfo(args.name, completed=args.completed))
    ctx.out(fmt.to_json(job) if args.json else job_info(job))


def cmd_domjobabort(ctx: Context, args: argparse.Namespace) -> None:
    ctx.client.fetch(mc.jobabort(args.name, postcopy=args.postcopy))


def cmd_migrate_postcopy(ctx: Context, args: argparse.Namespace) -> None:
    ctx.client.fetch(mc.start_postcopy(args.name))


def cmd_setmaxdowntime(ctx: Context, args: argparse.Namespace) -> None:
    ctx.client.fetch(mc.set_maxdowntime(args.name, args.downtime))


def cmd_getmaxdowntime(ctx: Context, args: argparse.Namespace) -> None:
    value = ctx.client.fetch(mc.get_maxdowntime(args.name))["downtime_ms"]
    ctx.out(fmt.to_json({"downtime_ms": value}) if args.json else str(value))


def cmd_setspeed(ctx: Context, args: argparse.Namespace) -> None:
    ctx.client.fetch(mc.set_speed(args.name, args.bandwidth))


def cmd_getspeed(ctx: Context, args: argparse.Namespace) -> None:
    value = ctx.client.fetch(mc.get_speed(args.name))["bandwidth_mib_s"]
    ctx.out(fmt.to_json({"bandwidth_mib_s": value}) if args.json else str(value))


# -- the table ------------------------------------------------------------------------------


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value

    return parse


def _switch(name: str, text: str) -> Arg:
    return arg(f"--{name}", action="store_true", help=text)


MIGRATE_ARGS = (
    NAME,
    arg("desturi", metavar="DESTURI", help="vmferryd of the destination host"),
    _switch("live", "live migration: the guest keeps running while its memory moves"),
    _switch("offline", "move the definition only (needs --persistent)"),
    _switch("p2p", "peer-to-peer: the source daemon connects to DESTURI itself"),
    _switch("persistent", "make the domain persistent on the destination"),
    _switch("undefinesource", "undefine the domain on the source"),
    _switch("suspend", "leave the domain paused on the destination"),
    _switch("auto-converge", "throttle the guest's vCPUs when the migration does not converge"),
    _switch("compressed", "compress pages (xbzrle; zstd with --parallel)"),
    arg(
        "--comp-methods",
        choices=("xbzrle", "zstd"),
        help="compression method (implies --compressed; zstd needs --parallel)",
    ),
    _switch("tls", "encrypt the migration stream with QEMU's TLS and the hosts' PKI"),
    _switch(
        "tunnelled",
        "send the stream inside the daemons' own TLS connection (needs --p2p)",
    ),
    arg("--dname", metavar="NAME", help="rename the domain on the destination"),
    arg("--xml", metavar="FILE", help="domain XML for the destination (same ABI)"),
    arg("--migrateuri", metavar="URI", help="where to send the migration stream (tcp:HOST:PORT)"),
    arg("--listen-address", metavar="ADDR", help="address the destination listens on"),
    arg("--bandwidth", type=_count(1), metavar="MiB/s", help="bandwidth limit"),
    arg(
        "--timeout",
        type=_count(1),
        metavar="N",
        help="suspend a live guest after N seconds so that its migration completes",
    ),
    arg("--parallel", type=_count(1), metavar="N", help="move memory over N connections"),
    arg(
        "--policy",
        metavar="NAME|FILE",
        help="convergence policy: a built-in name (vmferry, none, nova, ovirt-minimal-downtime, "
        "ovirt-postcopy, ovirt-suspend) or a TOML file; default: the daemon's [migration] policy "
        "(vmferry); none: QEMU's behaviour, no default contract",
    ),
    arg(
        "--downtime-target",
        type=_count(1),
        metavar="MS",
        help="the contract's downtime target in milliseconds (default: the daemon's)",
    ),
    arg(
        "--deadline",
        type=_count(1),
        metavar="S",
        help="the contract's deadline: complete within S seconds (default: the daemon's)",
    ),
    _switch("postcopy", "enable post-copy (switch with migrate-postcopy or the options below)"),
    _switch(
        "postcopy-after-precopy",
        "switch to post-copy once the first full pass of pre-copy is over",
    ),
    arg(
        "--postcopy-bandwidth",
        type=_count(1),
        metavar="MiB/s",
        help="bandwidth limit of the post-copy phase",
    ),
    _switch(
        "postcopy-resume",
        "resume a post-copy migration that failed (with --postcopy; DESTURI: where the guest runs)",
    ),
    _switch(
        "no-postcopy-autoresume",
        "after a post-copy failure, wait for --postcopy-resume instead of resuming automatically",
    ),
    _switch("copy-storage-all", "copy the non-shared disks, each with its whole backing chain"),
    _switch(
        "copy-storage-inc",
        "copy the top layer of the non-shared disks (their backing files exist on both hosts)",
    ),
    arg(
        "--migrate-disks",
        metavar="vda,vdb",
        help="the disks to copy (default: every writable non-shared disk)",
    ),
    _switch(
        "copy-storage-synchronous-writes",
        "the guest's disk writes wait for the copy, so a disk-busy guest converges",
    ),
    _switch("v2", "use migration protocol v2 (default: v3 when the destination has it)"),
    _switch("verbose", "show the migration's progress"),
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "migrate",
        "migrate a domain to another host",
        cmd_migrate,
        MIGRATE_ARGS,
        json=True,
    ),
    Command(
        "domjobinfo",
        "show the domain's running (or last completed) job",
        cmd_domjobinfo,
        (NAME, arg("--completed", action="store_true", help="the last completed job")),
        json=True,
    ),
    Command(
        "domjobabort",
        "abort the domain's running migration",
        cmd_domjobabort,
        (
            NAME,
            arg(
                "--postcopy",
                action="store_true",
                help="pause a post-copy migration (it cannot be aborted) so it can be resumed",
            ),
        ),
    ),
    Command(
        "migrate-postcopy",
        "switch the domain's running outgoing migration to post-copy",
        cmd_migrate_postcopy,
        (NAME,),
    ),
    Command(
        "migrate-setmaxdowntime",
        "set the longest pause a live migration may take to complete",
        cmd_setmaxdowntime,
        (NAME, arg("downtime", type=_count(1), metavar="MS", help="milliseconds")),
    ),
    Command(
        "migrate-getmaxdowntime",
        "show the longest pause (ms) a live migration may take to complete",
        cmd_getmaxdowntime,
        (NAME,),
        json=True,
    ),
    Command(
        "migrate-setspeed",
        "set the migration bandwidth limit",
        cmd_setspeed,
        (NAME, arg("bandwidth", type=_count(0), metavar="MiB/s", help="0: unlimited")),
    ),
    Command(
        "migrate-getspeed",
        "show the migration bandwidth limit in MiB/s (0: unlimited)",
        cmd_getspeed,
        (NAME,),
        json=True,
    ),
)
