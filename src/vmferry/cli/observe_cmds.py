"""``vmferry metrics``: a summary of the daemon's Prometheus metrics (``GET /metrics``).

The parsing lives in :func:`summarize` (plain data in, plain data out) so that
the table and ``--json`` show the same figures. prometheus_client is imported
only when the command runs: the CLI's other commands never pay for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from vmferry.cli import format as fmt
from vmferry.cli.context import Command, Context, arg

#: Routes shown in the table (the busiest first); --json has them all.
TOP_ROUTES = 10


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)


def _timing(count: float, total: float) -> dict[str, float]:
    return {"count": int(count), "mean_ms": round(total / count * 1000, 1) if count else 0.0}


def summarize(text: str) -> dict[str, Any]:
    """The figures of a ``/metrics`` answer that ``vmferry metrics`` shows."""
    out: dict[str, Any] = {
        "domains": {},
        "qemu_processes": 0,
        "migrations_active": {},
        "migrations": [],
        "migration_bytes": {},
        "phases": [],
        "downtime": [],
        "job_waits": [],
        "api": [],
    }
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
    for name, labels, value in _samples(text):
        if name == "vmferry_domains":
            out["domains"][labels["state"]] = int(value)
        elif name == "vmferry_qemu_processes":
            out["qemu_processes"] = int(value)
        elif name == "vmferry_migrations_active":
            out["migrations_active"][labels["side"]] = int(value)
        elif name == "vmferry_migrations_total":
            out["migrations"].append({**labels, "count": int(value)})
        elif name == "vmferry_migration_bytes_total":
            out["migration_bytes"][labels["side"]] = int(value)
        elif name.endswith(("_count", "_sum")):
            base, kind = name.rsplit("_", 1)
            key = (base, tuple(sorted(labels.items())))
            pair = sums.setdefault(key, [0.0, 0.0])
            pair[0 if kind == "count" else 1] = value
    where = {
        "vmferry_migration_phase_seconds": "phases",
        "vmferry_migration_downtime_seconds": "downtime",
        "vmferry_job_wait_seconds": "job_waits",
        "vmferry_api_request_duration_seconds": "api",
    }
    for (base, pairs), (count, total) in sorted(sums.items()):
        if base in where and count:
            out[where[base]].append({**dict(pairs), **_timing(count, total)})
    out["api"].sort(key=lambda row: -row["count"])
    return out


def _rows(title: str, rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    if not rows:
        return []
    lines = [f"{title}:"]
    for row in rows:
        label = " ".join(str(row.get(k, "")) for k in keys)
        lines.append(f"  {label:<46} {row['count']:>7}  mean {row['mean_ms']:>9.1f} ms")
    return lines


def render(summary: dict[str, Any]) -> str:
    """The human table of :func:`summarize`."""
    domains = ", ".join(f"{state} {n}" for state, n in summary["domains"].items() if n) or "none"
    active = summary["migrations_active"]
    lines = [
        f"Domains:            {domains}",
        f"QEMU processes:     {summary['qemu_processes']}",
        f"Active migrations:  source {active.get('source', 0)}, "
        f"destination {active.get('destination', 0)}",
    ]
    if summary["migrations"]:
        lines.append("Migrations:")
        for row in summary["migrations"]:
            lines.append(f"  {row['side']:<12} {row['mode']:<9} {row['result']:<10} {row['count']}")
    else:
        lines.append("Migrations:         none ended since the daemon started")
    for side, moved in summary["migration_bytes"].items():
        lines.append(f"Bytes moved ({side}): {moved / (1 << 20):.1f} MiB")
    lines += _rows("Step times", summary["phases"], ("side", "phase"))
    lines += _rows("Downtime", summary["downtime"], ("side", "kind"))
    lines += _rows("Job waits", summary["job_waits"], ("job",))
    lines += _rows("API latency", summary["api"][:TOP_ROUTES], ("method", "route", "status"))
    return "\n".join(lines)


def cmd_metrics(ctx: Context, args: argparse.Namespace) -> None:
    text = ctx.client.metrics()
    if args.raw:
        ctx.out(text, end="")
        return
    summary = summarize(text)
    ctx.out(fmt.to_json(summary) if args.json else render(summary))


COMMANDS: tuple[Command, ...] = (
    Command(
        "metrics",
        "summarize the daemon's metrics (migrations, step times, downtime, API latency)",
        cmd_metrics,
        (arg("--raw", action="store_true", help="print /metrics as Prometheus serves it"),),
        json=True,
    ),
)
