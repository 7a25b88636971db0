"""The live ``rich`` progress bar of ``vmferry migrate`` on a terminal (see :mod:`.progress`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from vmferry.cli.progress import NoProgress, fields, new_actions, percent, policy_action


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
        self._actions = 0

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

    def start(self, migration_id: str) -> None:
        self.console.print(f"Migration id: {migration_id}", highlight=False)

    def __call__(self, step: str, stats: Mapping[str, Any] | None) -> None:
        self._step = step
        if not stats:
            self._bar.update(self._task, step=step)
        else:
            self._show(stats)
            self._show_actions(stats)
        # Draw now: steps are often shorter than the bar's refresh period.
        self._bar.refresh()

    def _show_actions(self, stats: Mapping[str, Any]) -> None:
        # Printed above the bar, which keeps redrawing below them.
        for action in new_actions(stats, self._actions):
            self._actions += 1
            self.console.print(f"policy action {policy_action(action)}", highlight=False)

    def finish(self, stats: Mapping[str, Any]) -> None:
        self._step = "done"
        # A completed migration has sent everything, whatever the last poll said.
        self._show({**stats, "data_remaining": 0})

    def _show(self, stats: Mapping[str, Any]) -> None:
        self._bar.details = details(stats)
        self._bar.update(self._task, completed=percent(stats), step=self._step)
