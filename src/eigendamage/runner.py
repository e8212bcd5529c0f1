"""Jobs behind the CLI: train a model, prune it, and the default demo.

Each job writes into its own directory (:mod:`eigendamage.run_dir` owns it: locking,
``--force``, what a failure leaves): ``config.json`` (resolved), ``environment.json``
(versions, git commit, device), ``metrics.json`` and the model (``model/``: safetensors +
JSON).  Two rules of the jobs themselves make the directories trustworthy:

* **validate first**: config, data, device, model and method are checked (and the model
  loaded and run on one batch) before the directory is created, so bad input leaves
  nothing behind;
* **checkpoint at boundaries**: training checkpoints every epoch, pruning every round and
  every fine-tuning epoch, all atomically; ``resume=True`` continues from the last
  finished boundary and, on CPU with a fixed seed, ends bit-identical to an uninterrupted
  run.  ``metrics.json`` is written last: its presence means the run is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FineTuneConfig, PruneConfig, TrainConfig
from .data import Loaders, make_loaders
from .distributed import is_main, on_main, only_main
from .errors import ConfigError, DataError, ModelError, unknown_name
from .io import CheckpointError, atomic_write_json, load_model, load_model_file, save_model
from .measure import Counts, count, reduction
from .models import create_model
from .pruner import PruneResult, RoundInfo, available_methods, run_pruning
from .run_dir import (
    METRICS_FILE,
    MODEL_DIR,
    PREVIOUS_RUN,
    ROUNDS_DIR,
    RUN_FILES,
    SETTING_ASIDE,
    SOURCE_FILE,
    STATE_FILE,
    TRAIN_CHECKPOINT,
    Log,
    Run,
    claimed,
    finished_metrics,
    source_digest,
    write_run_files,
)
from .seeding import seed_everything
from .train import evaluate, model_logits, recalibrate_bn, reseed_loader, train

__all__ = [
    "METRICS_FILE",
    "MODEL_DIR",
    "PREVIOUS_RUN",
    "RUN_FILES",
    "SETTING_ASIDE",
    "TRAIN_CHECKPOINT",
    "Log",
    "finished_metrics",
    "resolve_device",
    "run_prune",
    "run_train",
    "summary_rows",
]


def resolve_device(device: str) -> torch.device:
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


def _loaders(cfg: TrainConfig | PruneConfig) -> Loaders:
    return make_loaders(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size, seed=cfg.seed)


def _absolute_paths(cfg: Any) -> Any:
    """Record paths as absolute ones, so ``--resume`` works from any working directory."""
    update = {
        key: os.path.abspath(value)
        for key in ("checkpoint", "data_root")
        if isinstance(value := getattr(cfg, key, None), str)
    }
    return cfg.model_copy(update=update)


# --------------------------------------------------------------------------- checks


def _check_forward(model: nn.Module, loaders: Loaders, what: str, dataset: str) -> None:
    """Run ``model`` (still on the CPU) on two validation images: a model/dataset mismatch
    or a broken checkpoint fails here with one clear line instead of deep inside the run."""
    try:
        inputs, _ = next(iter(loaders.val))
    except StopIteration:
        raise DataError(f"dataset {dataset!r} has no validation examples") from None
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            model.eval()
            logits = model_logits(model, inputs[:2])
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{what} cannot take {dataset!r} inputs of shape {tuple(inputs.shape[1:])}: {first}"
            ) from exc
        finally:
            for m, training in modes:
                m.training = training
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


def _unsupported_layers(model: nn.Module, supported: Callable[[nn.Module], bool]) -> str:
    found = [
        f"{name!r} ({type(m).__name__})"
        for name, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
        and not supported(m)
        and not isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    return f"unsupported: {', '.join(found[:6])}" if found else "it has no other layer"


def _check_prunable(model: nn.Module, method: str, input_shape: tuple[int, ...]) -> None:
    """Fail before the run when ``method`` finds nothing to prune, naming what it skips."""
    from .criteria import CRITERIA, WEIGHT_METHODS
    from .criteria.eigendamage import classifier_name, eigendamage_targets

    output = classifier_name(model)
    exclude = {output} if output else set()
    if method == "eigendamage" or method in WEIGHT_METHODS:

        def supported(m: nn.Module) -> bool:
            return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)

        if method == "eigendamage":
            found = eigendamage_targets(model, exclude)
        else:
            found = [n for n, m in model.named_modules() if supported(m) and n not in exclude]
        if not found:
            raise ModelError(
                f"no layer {method} can prune: it prunes nn.Linear and nn.Conv2d (groups=1) "
                f"layers except the output layer {output!r}; "
                + _unsupported_layers(model, supported)
            )
    elif method in CRITERIA:
        from .structure import ChannelGroups

        ref = next(model.parameters(), torch.zeros(()))
        example = torch.zeros(input_shape, dtype=ref.dtype, device=ref.device)
        groups = ChannelGroups.build(model, example, sorted(exclude))
        if not len(groups):
            why = "; ".join(f"{g}: {r}" for g, r in groups.skipped.items())
            raise ModelError(
                f"no channel group {method} can prune "
                f"({why or f'no Conv2d/Linear layer besides the output layer {output!r}'})"
            )


# --------------------------------------------------------------------------- train


def _write_result(out_dir: Path, model: nn.Module, metrics: dict[str, Any]) -> None:
    """The finished run: the model, then the metrics (whose presence marks it finished)."""
    save_model(model.cpu(), out_dir / MODEL_DIR)
    atomic_write_json(out_dir / METRICS_FILE, metrics)


def run_train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    log: Log = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` from scratch; epoch checkpoints allow resume."""
    with claimed(out, force, resume, log, progress) as run:
        return run.done if run.done is not None else _train(cfg, run)


def _train(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    out_dir, log, progress, resume = run.out_dir, run.log, run.progress, run.resume
    cfg = _absolute_paths(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    loaders = _loaders(cfg)
    spec = loaders.spec
    model = create_model(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    _check_forward(model, loaders, f"model {cfg.model!r}", cfg.dataset)
    with run.started():
        only_main(write_run_files)(out_dir, cfg, device, resume)
        start = time.perf_counter()
        history = train(
            model,
            loaders.train,
            epochs=cfg.epochs,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            val_loader=loaders.val,
            seed=cfg.seed,
            device=device,
            l1_bn=cfg.l1_bn,
            checkpoint_path=out_dir / TRAIN_CHECKPOINT,
            resume=resume,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        counts = count(model, (1, *spec.input_shape))
        metrics = {
            **_accuracy(model, loaders, device),
            "params": counts.params,
            "flops": counts.flops,
            "seconds": {"train": seconds},
            "history": history.to_dict(),
        }
        only_main(_write_result)(out_dir, model, metrics)
    log(f"trained {cfg.model}: val {metrics['val_acc']:.4f}, test {metrics['test_acc']:.4f}")
    return metrics


def _accuracy(model: nn.Module, loaders: Loaders, device: torch.device) -> dict[str, float]:
    return {
        "val_acc": evaluate(model, loaders.val, device=device).accuracy,
        "test_acc": evaluate(model, loaders.test, device=device).accuracy,
    }


# --------------------------------------------------------------------------- prune


def _finetuner(
    cfg: FineTuneConfig,
    loaders: Loaders,
    out_dir: Path,
    seed: int,
    device: torch.device,
    progress: bool,
) -> Callable[[nn.Module, int], None]:
    def finetune(model: nn.Module, round_index: int) -> None:
        if cfg.bn_recalibration_batches != 0:
            reseed_loader(loaders.train, seed * 7919 + round_index)
            recalibrate_bn(
                model, loaders.train, batches=cfg.bn_recalibration_batches, device=device
            )
        if cfg.epochs == 0:
            return
        train(
            model,
            loaders.train,
            epochs=cfg.epochs,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            seed=seed + round_index,
            device=device,
            checkpoint_path=_finetune_checkpoint(out_dir, round_index),
            resume=True,
            progress=progress,
        )

    return finetune


def _finetune_checkpoint(out_dir: Path, round_index: int) -> Path:
    return out_dir / ROUNDS_DIR / f"finetune_{round_index}.pt"


def _last_finished_round(out_dir: Path) -> tuple[int, dict[str, Any]]:
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


def _source_model(
    cfg: PruneConfig, num_classes: int, in_channels: int, log: Log, allow_pickle: bool
) -> nn.Module:
    """The model to prune: a checkpoint (safe model dir; state_dict/pickle files on request)
    or, for experiments, an untrained registry model."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # weights are loaded over the init
            return create_model(cfg.model, num_classes=num_classes, in_channels=in_channels)

    if cfg.checkpoint is None:
        model = create_model(cfg.model, num_classes=num_classes, in_channels=in_channels)
        log(f"warning: pruning an untrained {cfg.model}; pass --checkpoint for a trained one")
        return model
    return load_model_file(
        cfg.checkpoint, allow_pickle=allow_pickle, build=build if cfg.model else None
    )


def _check_checkpoint_outside(cfg: PruneConfig, out_dir: Path) -> None:
    if cfg.checkpoint is None:
        return
    source, out = Path(cfg.checkpoint).resolve(), out_dir.resolve()
    if source == out or out in source.parents:
        raise ConfigError(
            f"--checkpoint {cfg.checkpoint} lies inside the output directory {out_dir}, which "
            "the run overwrites; choose another --out"
        )


def run_prune(
    cfg: PruneConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    log: Log = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune a model (a registry name, or a directory written by ``save_model``).

    ``allow_pickle`` lets a legacy ``torch.save`` checkpoint load (unpickling runs its
    code); it is an argument, never part of ``cfg``, so no file can switch it on."""
    with claimed(out, force, resume, log, progress) as run:
        return run.done if run.done is not None else _prune(cfg, run, allow_pickle)


def _prune(cfg: PruneConfig, run: Run, allow_pickle: bool) -> dict[str, Any]:
    out_dir, log, progress, resume = run.out_dir, run.log, run.progress, run.resume
    cfg = _absolute_paths(cfg)
    methods = available_methods()
    if cfg.method not in methods:
        raise ConfigError(unknown_name("method", cfg.method, methods))
    if not resume:
        _check_checkpoint_outside(cfg, out_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    loaders = _loaders(cfg)
    spec = loaders.spec
    input_shape = (1, *spec.input_shape)
    original = _source_model(cfg, spec.num_classes, spec.in_channels, log, allow_pickle)
    what = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else f"model {cfg.model!r}"
    _check_forward(original, loaders, what, cfg.dataset)
    _check_prunable(original, cfg.method, input_shape)
    source = on_main(source_digest, cfg, out_dir, resume, log)
    finished, state = _last_finished_round(out_dir) if resume else (0, {})
    model = original
    if finished:
        try:
            model = load_model(out_dir / ROUNDS_DIR / f"round_{finished}")
        except ModelError as exc:
            raise CheckpointError(
                f"{exc}; delete {out_dir / ROUNDS_DIR / STATE_FILE} to redo all rounds"
            ) from exc
    with run.started():
        if source is not None and not (resume and (out_dir / SOURCE_FILE).is_file()):
            # before config.json: every run that can be resumed has its record
            only_main(atomic_write_json)(
                out_dir / SOURCE_FILE, {"checkpoint": cfg.checkpoint, "sha256": source}
            )
        only_main(write_run_files)(out_dir, cfg, device, resume)
        original = original.to(device)
        model = model.to(device)
        reference = count(original, input_shape)
        if finished:
            log(f"resuming after round {finished} of {cfg.rounds}")
        before_acc = state.get("before") or _accuracy(original, loaders, device)
        rounds_done: list[dict[str, Any]] = list(state.get("rounds", []))

        def on_round(pruned: nn.Module, info: RoundInfo) -> None:
            only_main(save_model)(pruned, out_dir / ROUNDS_DIR / f"round_{info.round}")
            rounds_done.append(_round_record(info, pruned, loaders, device))
            only_main(atomic_write_json)(
                out_dir / ROUNDS_DIR / STATE_FILE,
                {"finished_rounds": info.round, "before": before_acc, "rounds": rounds_done},
            )
            # The round is safe in round_k/: its fine-tuning checkpoint is no longer needed,
            # nor the run that --force replaced.
            if is_main():
                _finetune_checkpoint(out_dir, info.round).unlink(missing_ok=True)
            run.commit()

        result = run_pruning(
            model,
            loaders.train,
            method=cfg.method,
            ratio=cfg.ratio,
            target_params=cfg.target_params,
            target_flops=cfg.target_flops,
            rounds=cfg.rounds,
            input_shape=input_shape,
            per_layer_cap=cfg.per_layer_cap,
            fisher=cfg.fisher,
            fisher_batches=cfg.fisher_batches,
            fisher_samples=cfg.fisher_samples,
            damping=cfg.damping,
            normalize=cfg.normalize,
            seed=cfg.seed,
            device=device,
            log=log,
            finetune=_finetuner(cfg.finetune, loaders, out_dir, cfg.seed, device, progress),
            start_round=finished + 1,
            reference=reference,
            on_round=on_round,
            before_round=lambda r: reseed_loader(loaders.train, cfg.seed * 104729 + r),
        )
        metrics = _prune_metrics(result, reference, before_acc, loaders, device, rounds_done)
        only_main(_write_result)(out_dir, result.model, metrics)
    return metrics


def _round_record(
    info: RoundInfo, model: nn.Module, loaders: Loaders, device: torch.device
) -> dict[str, Any]:
    record = asdict(info)
    record["detail"] = {k: v for k, v in info.detail.items() if k != "forms"}
    record["val_acc"] = evaluate(model, loaders.val, device=device).accuracy
    return record


def _prune_metrics(
    result: PruneResult,
    reference: Counts,
    before_acc: dict[str, float],
    loaders: Loaders,
    device: torch.device,
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    after_acc = _accuracy(result.model, loaders, device)
    removed = reduction(reference, result.after)
    return {
        "before": {**before_acc, "params": reference.params, "flops": reference.flops},
        "after": {**after_acc, "params": result.after.params, "flops": result.after.flops},
        "params_removed": removed["params"],
        "flops_removed": removed["flops"],
        "test_acc_change": after_acc["test_acc"] - before_acc["test_acc"],
        "rounds": rounds,
        "seconds": {
            stage: sum(r["seconds"].get(stage, 0.0) for r in rounds)
            for stage in sorted({s for r in rounds for s in r["seconds"]})
        },
    }


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Before/after table rows: accuracy (%), params and FLOPs."""
    b, a = metrics["before"], metrics["after"]

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    def pts(x: float) -> str:
        return f"{100 * x:+.2f} pt"

    return [
        {
            "model": "original",
            "val acc": pct(b["val_acc"]),
            "test acc": pct(b["test_acc"]),
            "params": f"{b['params']:,}",
            "FLOPs": f"{b['flops']:,}",
        },
        {
            "model": "pruned",
            "val acc": pct(a["val_acc"]),
            "test acc": pct(a["test_acc"]),
            "params": f"{a['params']:,}",
            "FLOPs": f"{a['flops']:,}",
        },
        {
            "model": "change",
            "val acc": pts(a["val_acc"] - b["val_acc"]),
            "test acc": pts(a["test_acc"] - b["test_acc"]),
            "params": f"-{metrics['params_removed']:.1%}",
            "FLOPs": f"-{metrics['flops_removed']:.1%}",
        },
    ]
