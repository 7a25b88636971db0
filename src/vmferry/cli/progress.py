"""Progress of a running migration: a live ``rich`` bar, plain lines, or nothing.

:func:`open_view` picks the view: a bar when the output is a terminal, one
line per update with ``--verbose`` otherwise (a bar cannot redraw in a pipe
or a log file), nothing at all without either.  Each view is a
``progress(step, stats | None)`` callback, as
:func:`vmferry.client.migrate.migrate` expects, and a context manager that
draws the bar while the migration runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

# rich is imported (vmferry.cli.progress_bar) only when a bar is drawn: on a terminal.

MIB = 1 << 20


def _int(stats: Mapping[str, Any], key: str) -> int:
    try:
        return int(stats.get(key) or 0)
    except (TypeError, ValueError):
        return 0


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


def percent(stats: Mapping[str, Any]) -> int:
    """virsh's figure: the share of the guest's memory no longer left to send."""
    total = _int(stats, "data_total")
    if total <= 0:
        return 0
    done = total - min(_int(stats, "data_remaining"), total)
    return done * 100 // total


def eta_s(stats: Mapping[str, Any]) -> float | None:
    """Seconds left: the policy engine's prediction, else remaining / rate; None without a rate."""
    if stats.get("policy_eta_s") is not None:
        return float(stats["policy_eta_s"])
    rate = _int(stats, "memory_bps") + _int(stats, "disk_bps")  # disks mirror meanwhile
    return _int(stats, "data_remaining") / rate if rate > 0 else None


def fields(step: str, stats: Mapping[str, Any] | None) -> dict[str, str]:
    """The bar's text columns; ``-`` where QEMU has not said yet."""
    if not stats:
        return {
            "step": step,
            "moved": "-",
            "remaining": "-",
            "rate": "-",
            "iteration": "-",
            "eta": "-",
        }
    eta = eta_s(stats)
    return {
        "step": step,
        "moved": f"{mib(_int(stats, 'data_processed'))} / {mib(_int(stats, 'data_total'))}",
        "remaining": mib(_int(stats, "data_remaining")),
        "rate": f"{(_int(stats, 'memory_bps') + _int(stats, 'disk_bps')) / MIB:.1f} MiB/s",
        "iteration": str(_int(stats, "memory_iteration")),
        "eta": "-" if eta is None else f"{eta:.1f} s",
    }


def policy_action(action: Mapping[str, Any]) -> str:
    """One action of the convergence policy: ``t=3.1s it=4 throttle 60 (why)``."""
    text = f"t={action.get('t_s', 0)}s it={action.get('iteration', 0)} {action.get('action', '?')}"
    if "value" in action:
        text += f" {action['value']}"
    if action.get("skipped"):
        return text + f" skipped: {action['skipped']}"
    return text + (f" ({action['reason']})" if action.get("reason") else "")


def new_actions(stats: Mapping[str, Any] | None, seen: int) -> list[Mapping[str, Any]]:
    """The policy actions of *stats* after the first *seen* (the list only grows)."""
    actions = (stats or {}).get("policy_actions") or []
    return [a for a in actions[seen:] if isinstance(a, Mapping)]


def line(step: str, stats: Mapping[str, Any] | None) -> str:
    """One plain progress line (``--verbose`` without a terminal)."""
    if not stats:
        return f"Migration: {step}"
    f = fields(step, stats)
    return (
        f"Migration: [{percent(stats):3d} %] {step}: {f['moved']}, remaining {f['remaining']}, "
        f"{f['rate']}, iteration {f['iteration']}, ETA {f['eta']}"
    )


class NoProgress:
    """No output while the migration runs."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def __call__(self, step: str, stats: Mapping[str, Any] | None) -> None:
        return None

    def start(self, migration_id: str) -> None:
        """The migration has this id (the one in both daemons' logs)."""
        return None

    def finish(self, stats: Mapping[str, Any]) -> None:
        """Show the final figures (the last poll may be 0.5 s old, or never happened)."""
        return None


class LineProgress(NoProgress):
    """One line per step, per statistics update, per step's time and per policy action."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._step = ""
        self._since = 0.0
        self._actions = 0

    def _write(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def start(self, migration_id: str) -> None:
        self._write(f"Migration id: {migration_id}")

    def __call__(self, step: str, stats: Mapping[str, Any] | None) -> None:
        if stats is None:
            self._step_done()
            self._step, self._since = step, time.perf_counter()
        self._write(line(step, stats))
        self._show_actions(stats)

    def finish(self, stats: Mapping[str, Any]) -> None:
        self._step_done()
        self._show_actions(stats)

    def _step_done(self) -> None:
        if self._step:
            ms = (time.perf_counter() - self._since) * 1000
            self._write(f"Migration: {self._step} took {ms:.0f} ms")
        self._step = ""

    def _show_actions(self, stats: Mapping[str, Any] | None) -> None:
        for action in new_actions(stats, self._actions):
            self._actions += 1
            self._write(f"Migration: policy action {policy_action(action)}")


View = NoProgress


def open_view(stream: TextIO, *, verbose: bool, terminal: bool | None = None) -> View:
    """
    The progress view for *stream*.

    :param verbose: ``--verbose``: show progress even when *stream* is no terminal.
    :param terminal: Override the terminal check (tests).
    """
    is_tty = stream.isatty() if terminal is None else terminal
    if is_tty:
        from rich.console import Console

        from vmferry.cli.progress_bar import BarProgress

        return BarProgress(Console(file=stream, force_terminal=True))
    if verbose:
        return LineProgress(stream)
    return NoProgress()


def __getattr__(name: str) -> Any:
    if name == "BarProgress":  # lazy: it imports rich
        from vmferry.cli import progress_bar

        return progress_bar.BarProgress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
