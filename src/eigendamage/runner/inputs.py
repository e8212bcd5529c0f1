"""What a job reads and checks before its run directory is claimed: the device, the model to
prune (and that it takes the dataset's inputs), and the rounds a resumed prune run finished.
Bad input fails here with one clear line and leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PruneConfig
from ..data import Loaders
from ..errors import ConfigError, DataError, ModelError
from ..io import CheckpointError, load_model_file, load_or_create
from ..io.run_dir import ROUNDS_DIR, STATE_FILE, Log
from ..modelcall import call_model, restored_modes


def resolve_device(device: str) -> torch.device:
    """The config's ``device`` on this machine (``auto``: CUDA when available); a device
    that does not exist here is a :class:`~eigendamage.errors.ConfigError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but this torch has no usable MPS (Apple GPU) "
            "backend here; use --device cpu"
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but CUDA is not available here; use --device cpu"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
            "exist here"
        )
    return resolved


def absolute_paths(cfg: Any) -> Any:
    """Record paths as absolute ones, so ``--resume`` works from any working directory."""
    update = {
        key: os.path.abspath(value)
        for key in ("checkpoint", "data_root")
        if isinstance(value := getattr(cfg, key, None), str)
    }
    return cfg.model_copy(update=update)


def check_forward(model: nn.Module, loaders: Loaders, what: str, dataset: str) -> None:
    """Run ``model`` (still on the CPU) on two validation images: a model/dataset mismatch
    or a broken checkpoint fails here with one clear line instead of deep inside the run."""
    try:
        inputs, _ = next(iter(loaders.val))
    except StopIteration:
        raise DataError(f"dataset {dataset!r} has no validation examples") from None
    with torch.random.fork_rng(devices=[]), torch.no_grad(), restored_modes(model):
        try:
            model.eval()
            logits = call_model(model, inputs[:2])
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{what} cannot take {dataset!r} inputs of shape {tuple(inputs.shape[1:])}: {first}"
            ) from exc
    classes = loaders.spec.num_classes
    if logits.dim() != 2 or logits.shape[1] != classes:
        raise ModelError(
            f"{what} outputs shape {tuple(logits.shape[1:])}, but dataset {dataset!r} has "
            f"{classes} classes; use a model built for this dataset"
        )
    if not torch.isfinite(logits).all():
        raise ModelError(
            f"{what} outputs NaN/Inf on {dataset!r} data: the checkpoint is corrupt or the "
            "model diverged in training"
        )


def source_model(
    cfg: PruneConfig, num_classes: int, in_channels: int, log: Log, allow_pickle: bool
) -> nn.Module:
    """The model to prune: a checkpoint (safe model dir; state_dict/pickle files on request)
    or, for experiments, an untrained registry model."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # weights are loaded over the init
            return load_or_create(cfg.model, num_classes=num_classes, in_channels=in_channels)

    if cfg.checkpoint is None:
        model = load_or_create(
            cfg.model, num_classes=num_classes, in_channels=in_channels, seed=cfg.seed
        )
        log(f"warning: pruning an untrained {cfg.model}; pass --checkpoint for a trained one")
        return model
    return load_model_file(
        cfg.checkpoint, allow_pickle=allow_pickle, build=build if cfg.model else None
    )


def check_checkpoint_outside(cfg: PruneConfig, out_dir: Path) -> None:
    """The ``--checkpoint`` must not lie inside the run directory the run overwrites."""
    if cfg.checkpoint is None:
        return
    source, out = Path(cfg.checkpoint).resolve(), out_dir.resolve()
    if source == out or out in source.parents:
        raise ConfigError(
            f"--checkpoint {cfg.checkpoint} lies inside the output directory {out_dir}, which "
            "the run overwrites; choose another --out"
        )


def last_finished_round(out_dir: Path) -> tuple[int, dict[str, Any]]:
    """(rounds finished, their recorded state) of the prune run being resumed in ``out_dir``."""
    state_file = out_dir / ROUNDS_DIR / STATE_FILE
    if not state_file.is_file():
        return 0, {}
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        return int(state["finished_rounds"]), state
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{state_file} is unreadable ({exc}); delete {out_dir / ROUNDS_DIR} to redo all rounds"
        ) from exc
