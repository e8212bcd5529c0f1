"""How :func:`~eigendamage.train.train` reports its progress: a small protocol that an
application implements (the CLI draws rich bars, :mod:`eigendamage.cli.progress`); the
library itself prints nothing."""

from __future__ import annotations

from typing import Protocol


class TrainProgress(Protocol):
    """Receives a training run's progress; one object may follow several runs in turn."""

    def start_training(self, epochs: int, done: int, batches: int | None) -> None:
        """A run of ``epochs`` epochs begins, ``done`` of them finished before (resume),
        with ``batches`` batches per epoch (None: the loader has no length)."""

    def start_epoch(self) -> None:
        """An epoch begins."""

    def batch_done(self, info: str) -> None:
        """A batch was trained; ``info`` is its loss."""

    def epoch_done(self, info: str) -> None:
        """An epoch ended and was checkpointed; ``info`` holds its loss and accuracies."""

    def stop_training(self) -> None:
        """The run ended, finished or not."""


class Silent:
    """The default: progress goes nowhere."""

    def start_training(self, epochs: int, done: int, batches: int | None) -> None:
        pass

    def start_epoch(self) -> None:
        pass

    def batch_done(self, info: str) -> None:
        pass

    def epoch_done(self, info: str) -> None:
        pass

    def stop_training(self) -> None:
        pass


SILENT: TrainProgress = Silent()
