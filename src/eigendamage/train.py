"""Training, fine-tuning, evaluation and BatchNorm recalibration.

Pruning quality is only as trustworthy as the training around it, so this module is small,
plain SGD (as in the EigenDamage paper) and reproducible:

* a fresh run calls :func:`~eigendamage.seeding.seed_everything` with ``seed``;
* at the start of epoch ``e`` the train loader's own ``torch.Generator`` (if it has one) is
  reseeded with ``seed * 1000 + e``, so the shuffle order of an epoch does not depend on how
  many epochs ran in this process;
* after every epoch the checkpoint stores model, optimizer, schedule, history and
  :func:`~eigendamage.seeding.rng_state`; a killed run resumed from it ends with bit-identical
  weights on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .curvature.hooks import check_labels
from .distributed import is_main, shard_loader, wrap_ddp
from .errors import ConfigError, DataError, EigenDamageError, TrainingError
from .io import CheckpointError, load_checkpoint, save_checkpoint
from .seeding import rng_state, seed_everything, set_rng_state

__all__ = [
    "SCHEDULES",
    "EvalResult",
    "TrainHistory",
    "TrainingError",
    "evaluate",
    "lr_at",
    "model_logits",
    "recalibrate_bn",
    "reseed_loader",
    "train",
]

SCHEDULES = ("step", "cosine", "constant")
CHECKPOINT_FORMAT = "eigendamage-train"


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy, accuracy in [0, 1] and the number of examples seen."""

    loss: float
    accuracy: float
    n: int


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


# --------------------------------------------------------------------------- helpers


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        p = next(iter(model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise DataError(
        f"a loader batch must be (inputs, targets); got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
    )


def model_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Forward pass returning logits for plain tensors and HF-style ``.logits`` outputs."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise EigenDamageError(
            f"model output of type {type(out).__name__} is neither a tensor nor has .logits"
        )
    return logits


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


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
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed + 1)


def _bn_l1(model: nn.Module) -> torch.Tensor | None:
    gammas = [
        m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None
    ]
    if not gammas:
        return None
    return torch.stack([g.abs().sum() for g in gammas]).sum()


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None
) -> EvalResult:
    """Mean cross-entropy and accuracy in eval mode; the model's modes are restored after.

    ``device=None`` uses the device of the model's parameters; otherwise the model is moved.
    """
    dev = _resolve_device(device, model)
    if device is not None:
        model.to(dev)
    modes = _modes(model)
    total, correct, n = 0.0, 0, 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in loader:
                inputs, targets = _split(batch)
                inputs, targets = _to(inputs, dev), _to(targets, dev)
                logits = model_logits(model, inputs)
                check_labels(targets, logits.shape[1], "evaluation batch")
                total += F.cross_entropy(logits, targets, reduction="sum").item()
                correct += (logits.argmax(dim=1) == targets).sum().item()
                n += targets.shape[0]
    finally:
        _restore_modes(modes)
    if n == 0:
        raise DataError("evaluation loader yielded no examples")
    return EvalResult(loss=total / n, accuracy=correct / n, n=n)


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    batches: int | None = None,
    device: str | torch.device | None = None,
) -> int:
    """Re-estimate BatchNorm running statistics after surgery; returns examples used.

    Running stats are reset and re-accumulated as an exact average (``momentum=None``) over
    ``batches`` batches (all when None; 0 does nothing).  Only BN layers are put in train
    mode: dropout stays off, so the statistics match what the network sees at test time.
    Momentum and train/eval modes are restored; no gradients are computed.
    """
    if batches == 0:
        return 0
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    dev = _resolve_device(device, model)
    if device is not None:
        model.to(dev)
    modes = _modes(model)
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if batches is not None and i >= batches:
                    break
                inputs = batch[0] if isinstance(batch, list | tuple) else batch
                model_logits(model, _to(inputs, dev))
                seen += len(batch[1]) if isinstance(batch, list | tuple) and len(batch) > 1 else 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        _restore_modes(modes)
    if seen == 0:
        raise DataError("BatchNorm recalibration loader yielded no batches")
    return seen


# --------------------------------------------------------------------------- training


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


def _resume_state(
    path: Path, settings: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, TrainHistory]:
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


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


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
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place with SGD + momentum and cross-entropy; returns the history.

    ``l1_bn`` adds ``l1_bn * sum|gamma|`` over all BatchNorm weights (Network Slimming).
    With ``checkpoint_path`` a checkpoint is written atomically after every epoch; when it
    exists and ``resume`` is true, training continues after its last finished epoch (the
    settings must match).  ``log`` receives each epoch's record after it is checkpointed.
    The model's train/eval modes are restored at the end.
    """
    _check_args(epochs, lr, momentum, weight_decay, schedule, l1_bn)
    dev = _resolve_device(device, model)
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
        start, history = _resume_state(ckpt, settings, model, optimizer)
    else:
        seed_everything(seed)

    net = wrap_ddp(model)  # DDP when distributed: gradients averaged over ranks
    train_loader = shard_loader(train_loader, seed)  # this rank's share of every batch
    progress = progress and is_main()
    modes = _modes(model)
    n_batches = _batch_count(train_loader)
    try:
        with _progress(progress) as bar:
            epoch_task = bar.add_task("epochs", total=epochs, completed=start, info="")
            batch_task = bar.add_task("batches", total=n_batches, info="")
            for epoch in range(start, epochs):
                epoch_lr = lr_at(epoch, epochs, lr, schedule)
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr
                reseed_loader(train_loader, seed * 1000 + epoch)
                bar.reset(batch_task, total=n_batches)
                t0 = time.perf_counter()
                loss, acc = _train_epoch(
                    net,
                    train_loader,
                    optimizer,
                    dev,
                    l1_bn,
                    epoch,
                    epoch_lr,
                    lambda info: bar.update(batch_task, advance=1, info=info),
                )
                val = evaluate(model, val_loader, dev) if val_loader is not None else None
                history.train_loss.append(loss)
                history.train_acc.append(acc)
                history.val_loss.append(val.loss if val else None)
                history.val_acc.append(val.accuracy if val else None)
                history.lr.append(epoch_lr)
                history.seconds.append(time.perf_counter() - t0)
                if ckpt is not None and is_main():
                    save_checkpoint(
                        ckpt,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "version": 1,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": {"name": schedule, "base_lr": lr, "epochs": epochs},
                            "epoch": epoch + 1,
                            "settings": settings,
                            "history": history.to_dict(),
                            "rng": rng_state(),
                        },
                    )
                info = f"loss {loss:.4f} acc {acc:.3f}"
                if val is not None:
                    info += f" val_acc {val.accuracy:.3f}"
                bar.update(epoch_task, advance=1, info=info)
                if log is not None:
                    log(history.record(len(history) - 1))
    finally:
        _restore_modes(modes)
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
        inputs, targets = _split(batch)
        inputs, targets = _to(inputs, dev), _to(targets, dev)
        logits = model_logits(model, inputs)
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
