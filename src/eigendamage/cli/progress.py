"""Rich progress bars on stderr for the library's progress protocols: training
(:class:`~eigendamage.train.TrainProgress`, epochs and batches) and a comparison
(:class:`~eigendamage.compare.CompareProgress`, one step per run).  Bars are drawn only
when stderr is a terminal; training bars vanish when the run ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

Log = Callable[[str], None]


class Bars:
    """One object for a whole command: each training run and the comparison get a fresh
    rich :class:`~rich.progress.Progress`, started and stopped with them."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._batches: int | None = None

    def _start(self, *columns: Any, transient: bool) -> Progress:
        console = Console(stderr=True)
        bar = Progress(
            *columns, console=console, transient=transient, disable=not console.is_terminal
        )
        bar.start()
        self._bar = bar
        return bar

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._tasks = None, {}

    # training (TrainProgress)

    def start_training(self, epochs: int, done: int, batches: int | None) -> None:
        bar = self._start(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=True,
        )
        self._batches = batches
        self._tasks = {
            "epochs": bar.add_task("epochs", total=epochs, completed=done, info=""),
            "batches": bar.add_task("batches", total=batches, info=""),
        }

    def start_epoch(self) -> None:
        self._current().reset(self._tasks["batches"], total=self._batches)

    def batch_done(self, info: str) -> None:
        self._current().update(self._tasks["batches"], advance=1, info=info)

    def epoch_done(self, info: str) -> None:
        self._current().update(self._tasks["epochs"], advance=1, info=info)

    def stop_training(self) -> None:
        self._stop()

    # a comparison (CompareProgress)

    def start_runs(self, total: int, log: Log) -> Log:
        bar = self._start(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=False
        )
        self._tasks = {"runs": bar.add_task("compare", total=total)}
        if bar.disable:
            return log
        return lambda message: bar.console.print(message, markup=False, highlight=False)

    def show_run(self, what: str) -> None:
        self._current().update(self._tasks["runs"], description=what)

    def run_done(self) -> None:
        self._current().advance(self._tasks["runs"])

    def stop_runs(self) -> None:
        self._stop()

    def _current(self) -> Progress:
        assert self._bar is not None, "progress reported outside a run"
        return self._bar


def bars(off: bool) -> Bars | None:
    """The bars of a command.

    Args:
        off: ``--no-progress`` was given.

    Returns:
        A fresh :class:`Bars`, or None (no progress at all) when ``off``.
    """
    return None if off else Bars()
