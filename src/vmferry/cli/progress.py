"""Progress of a running migration: a live ``rich`` bar, plain lines, or nothing.

:func:`open_view` picks the view: a bar when the output is a terminal, one
line per update with ``--verbose`` otherwise (a bar cannot redraw in a pipe
or a log file), nothing at all without either.  Each view is a
``progress(step, stats | None)`` callback, as
:func:`vmferry.client.migrate.migrate` expects, and a context manager that
draws the bar while the migration runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from vmferry.api.models import JobStats

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

    def __call__(self, step: str, stats: JobStats | None) -> None:
        return None

    def finish(self, stats: Mapping[str, Any]) -> None:
        """Show the final figures (the last poll may be 0.5 s old, or never happened)."""
        return None


class LineProgress(NoProgress):
    """One line per step and per statistics update."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, step: str, stats: JobStats | None) -> None:
        self._stream.write(line(step, stats.stats if stats else None) + "\n")
        self._stream.flush()


class _TwoLineBar(Progress):
    """The bar, and under it a line of figures (one line would not fit 80 columns)."""

    details = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.details:
            yield Text(self.details, overflow="ellipsis", no_wrap=True)


def details(stats: Mapping[str, Any]) -> str:
    f = fields("", stats)
    return (
        f"  {f['moved']}, remaining {f['remaining']}, {f['rate']}, "
        f"iteration {f['iteration']}, ETA {f['eta']}"
    )


class BarProgress(NoProgress):
    """
    A live bar: step, percentage and elapsed time, then transferred / total,
    remaining, rate, iteration and ETA (remaining / rate).
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar = _TwoLineBar(
            TextColumn("[bold]{task.fields[step]:<8}"),
            BarColumn(bar_width=40),
            TextColumn("{task.percentage:>3.0f} %"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
        )
        self._task = self._bar.add_task("migration", total=100, step="start")
        self._step = "start"

    def __enter__(self) -> BarProgress:
        self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.stop()

    def __call__(self, step: str, stats: JobStats | None) -> None:
        self._step = step
        if stats is None or not stats.stats:
            self._bar.update(self._task, step=step)
        else:
            self._show(stats.stats)
        # Draw now: steps are often shorter than the bar's refresh period.
        self._bar.refresh()

    def finish(self, stats: Mapping[str, Any]) -> None:
        self._step = "done"
        # A completed migration has sent everything, whatever the last poll said.
        self._show({**stats, "data_remaining": 0})

    def _show(self, stats: Mapping[str, Any]) -> None:
        self._bar.details = details(stats)
        self._bar.update(self._task, completed=percent(stats), step=self._step)


View = NoProgress


def open_view(stream: TextIO, *, verbose: bool, terminal: bool | None = None) -> View:
    """
    The progress view for *stream*.

    :param verbose: ``--verbose``: show progress even when *stream* is no terminal.
    :param terminal: Override the terminal check (tests).
    """
    is_tty = stream.isatty() if terminal is None else terminal
    if is_tty:
        return BarProgress(Console(file=stream, force_terminal=True))
    if verbose:
        return LineProgress(stream)
    return NoProgress()
