"""The training loop: SGD + momentum with cross-entropy, learning-rate schedules, and the
reseeding that makes a resumed run see the batches an uninterrupted one would."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..distributed import is_main, shard_loader, wrap_ddp
from ..errors import ConfigError, DataError, TrainingError
from ..modelcall import (
    call_model,
    check_labels,
    resolve_device,
    restored_modes,
    split_batch,
    to_device,
)
from ..seeding import seed_everything
from .checkpoint import TrainHistory, resume_state, write_checkpoint
from .evaluation import evaluate
from .progress import SILENT, TrainProgress

SCHEDULES = ("step", "cosine", "constant")


def _batch_count(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def lr_at(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    """Learning rate of 0-based ``epoch``.

    ``step`` is the paper's schedule: x0.1 from 50% and x0.01 from 75% of the epochs.
    ``cosine`` anneals per epoch from ``lr`` towards 0; ``constant`` keeps ``lr``.
    """
    if schedule == "constant":
        return lr
    if schedule == "step":
        if epoch >= 0.75 * epochs:
            return lr * 0.01
        if epoch >= 0.5 * epochs:
            return lr * 0.1
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def reseed_loader(loader: Any, seed: int) -> None:
    """Make a pass's shuffle order and augmentation a function of ``seed`` only (so a resumed
    run sees exactly the batches an uninterrupted one would)."""
    seen: set[int] = set()
    for owner in (loader, getattr(loader, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            gen.manual_seed(seed)
            seen.add(id(gen))
    # Through wrappers such as ``torch.utils.data.Subset`` to the augmented dataset: its
    # augmentation draws would otherwise carry over from pass to pass.
    dataset = getattr(loader, "dataset", None)
    for _ in range(16):  # a wrapper chain, bounded
        if dataset is None or hasattr(dataset, "reseed"):
            break
        dataset = getattr(dataset, "dataset", None)
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed + 1)


def _bn_l1(model: nn.Module) -> torch.Tensor | None:
    gammas = [
        m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None
    ]
    if not gammas:
        return None
    return torch.stack([g.abs().sum() for g in gammas]).sum()


def _check_args(
    epochs: int, lr: float, momentum: float, weight_decay: float, schedule: str, l1_bn: float
) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not (math.isfinite(l1_bn) and l1_bn >= 0):
        raise ConfigError(f"l1_bn must be >= 0, got {l1_bn!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def train(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "step",
    val_loader: Iterable[Any] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    l1_bn: float = 0.0,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
    progress: TrainProgress | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place with SGD + momentum and cross-entropy; returns the history.

    ``l1_bn`` adds ``l1_bn * sum|gamma|`` over all BatchNorm weights (Network Slimming).
    With ``checkpoint_path`` a checkpoint is written atomically after every epoch; when it
    exists and ``resume`` is true, training continues after its last finished epoch (the
    settings must match).  ``log`` receives each epoch's record after it is checkpointed;
    ``progress`` (on the main rank only) follows epochs and batches.
    The model's train/eval modes are restored at the end.
    """
    _check_args(epochs, lr, momentum, weight_decay, schedule, l1_bn)
    dev = resolve_device(device, model)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    settings = {
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "seed": seed,
        "l1_bn": l1_bn,
    }
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start, history = 0, TrainHistory()
    if ckpt is not None and resume and ckpt.exists():
        start, history = resume_state(ckpt, settings, model, optimizer)
    else:
        seed_everything(seed)

    net = wrap_ddp(model)  # DDP when distributed: gradients averaged over ranks
    train_loader = shard_loader(train_loader, seed)  # this rank's share of every batch
    bars = progress if progress and is_main() else SILENT
    with restored_modes(model):
        try:
            bars.start_training(epochs, start, _batch_count(train_loader))
            for epoch in range(start, epochs):
                epoch_lr = lr_at(epoch, epochs, lr, schedule)
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr
                reseed_loader(train_loader, seed * 1000 + epoch)
                bars.start_epoch()
                t0 = time.perf_counter()
                loss, acc = _train_epoch(
                    net, train_loader, optimizer, dev, l1_bn, epoch, epoch_lr, bars.batch_done
                )
                val = evaluate(model, val_loader, dev) if val_loader is not None else None
                history.train_loss.append(loss)
                history.train_acc.append(acc)
                history.val_loss.append(val.loss if val else None)
                history.val_acc.append(val.accuracy if val else None)
                history.lr.append(epoch_lr)
                history.seconds.append(time.perf_counter() - t0)
                if ckpt is not None and is_main():
                    write_checkpoint(ckpt, model, optimizer, settings, epoch + 1, history)
                info = f"loss {loss:.4f} acc {acc:.3f}"
                if val is not None:
                    info += f" val_acc {val.accuracy:.3f}"
                bars.epoch_done(info)
                if log is not None:
                    log(history.record(len(history) - 1))
        finally:
            bars.stop_training()
    return history


def _train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    dev: torch.device,
    l1_bn: float,
    epoch: int,
    lr: float,
    tick: Callable[[str], None],
) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) of the training batches."""
    model.train()
    total, correct, n = 0.0, 0, 0
    for b, batch in enumerate(loader):
        inputs, targets = split_batch(batch)
        inputs, targets = to_device(inputs, dev), to_device(targets, dev)
        logits = call_model(model, inputs)
        check_labels(targets, logits.shape[1], f"training batch {b + 1}")
        loss = F.cross_entropy(logits, targets)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"training loss became {loss.item()} at epoch {epoch + 1}, batch {b + 1} "
                f"(lr {lr:g}); lower the learning rate or check the data for NaN/inf"
            )
        objective = loss
        if l1_bn > 0:
            penalty = _bn_l1(model)
            if penalty is not None:
                objective = loss + l1_bn * penalty
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        size = targets.shape[0]
        total += loss.item() * size
        correct += (logits.detach().argmax(dim=1) == targets).sum().item()
        n += size
        tick(f"loss {loss.item():.4f}")
    if n == 0:
        raise DataError("training loader yielded no batches")
    return total / n, correct / n
