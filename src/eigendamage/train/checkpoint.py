"""What a training epoch leaves behind: the per-epoch history and the checkpoint that lets a
killed run continue with bit-identical weights on CPU (model, optimizer, schedule, history
and :func:`~eigendamage.seeding.rng_state`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TrainingError
from ..io import CheckpointError, load_checkpoint, save_checkpoint
from ..seeding import rng_state, set_rng_state

CHECKPOINT_FORMAT = "eigendamage-train"


@dataclass
class TrainHistory:
    """Per-epoch curves; ``val_*`` entries are None when no validation loader was given."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    val_acc: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.train_loss)

    def to_dict(self) -> dict[str, list[Any]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainHistory:
        return cls(**{k: list(data.get(k, [])) for k in cls.__dataclass_fields__})

    def record(self, epoch: int) -> dict[str, Any]:
        """Epoch ``epoch`` (0-based) as a flat dict, 1-based ``epoch`` for humans."""
        return {"epoch": epoch + 1, **{k: v[epoch] for k, v in self.to_dict().items()}}


def resume_state(
    path: Path, settings: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, TrainHistory]:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and the RNGs; returns
    (finished epochs, history).  It must have been written with the same ``settings``."""
    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint")
    old = state.get("settings", {})
    diff = [f"{k}={old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise TrainingError(
            f"checkpoint {path} was written with different settings ({'; '.join(diff)}); "
            "resume with the same settings, or start over without resuming"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match this model: {first}") from exc
    set_rng_state(state["rng"])
    return int(state["epoch"]), TrainHistory.from_dict(state["history"])


def write_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: dict[str, Any],
    epochs_done: int,
    history: TrainHistory,
) -> None:
    """The checkpoint after ``epochs_done`` epochs, written atomically."""
    save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "name": settings["schedule"],
                "base_lr": settings["lr"],
                "epochs": settings["epochs"],
            },
            "epoch": epochs_done,
            "settings": settings,
            "history": history.to_dict(),
            "rng": rng_state(),
        },
    )
