"""Jobs behind the CLI: train a model and prune it (:mod:`.inputs` checks their input first).

Each job writes into its own directory (:mod:`eigendamage.io.run_dir` owns it: locking,
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

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FineTuneConfig, PruneConfig, TrainConfig
from ..data import Loaders, make_loaders
from ..distributed import is_main, on_main, only_main
from ..errors import ConfigError, ModelError, unknown_name
from ..io import CheckpointError, atomic_write_json, load_model, load_or_create, save_model
from ..io.run_dir import (
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
from ..measure import count
from ..methods import RoundInfo, available_methods, get_method, run_pruning
from ..methods.checks import excluded_roots
from ..reported import prune_metrics
from ..seeding import seed_everything
from ..train import TrainHistory, TrainProgress, evaluate, recalibrate_bn, reseed_loader, train
from .inputs import (
    absolute_paths,
    check_checkpoint_outside,
    check_forward,
    last_finished_round,
    resolve_device,
    source_model,
)

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
]


def _loaders(cfg: TrainConfig | PruneConfig) -> Loaders:
    return make_loaders(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size, seed=cfg.seed)


# --------------------------------------------------------------------------- checks


def _check_prunable(
    model: nn.Module, method: str, input_shape: tuple[int, ...], exclude: Sequence[str] = ()
) -> None:
    """Fail before the run when ``exclude`` names a module ``model`` lacks or when
    ``method`` finds nothing to prune, naming what it skips."""
    excluded_roots(model, exclude, None)
    get_method(method).check(model, input_shape)


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
    progress: TrainProgress | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` from scratch; epoch checkpoints allow resume.
    ``progress`` follows the epochs (on the main rank; default: nothing is shown)."""
    with claimed(out, force, resume, log, progress is not None) as run:
        return run.done if run.done is not None else _train(cfg, run, progress)


def _fit(
    model: nn.Module,
    loaders: Loaders,
    recipe: TrainConfig | FineTuneConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path,
    resume: bool,
    progress: TrainProgress | None,
    validate: bool = False,
    l1_bn: float = 0.0,
) -> TrainHistory:
    """``recipe``'s SGD on the training split: training (a TrainConfig) or one round's
    fine-tuning (a FineTuneConfig), checkpointed every epoch."""
    return train(
        model,
        loaders.train,
        epochs=recipe.epochs,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        val_loader=loaders.val if validate else None,
        seed=seed,
        device=device,
        l1_bn=l1_bn,
        checkpoint_path=checkpoint,
        resume=resume,
        progress=progress,
    )


def _train(cfg: TrainConfig, run: Run, progress: TrainProgress | None) -> dict[str, Any]:
    out_dir, log, resume = run.out_dir, run.log, run.resume
    progress = progress if run.progress else None
    cfg = absolute_paths(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    loaders = _loaders(cfg)
    spec = loaders.spec
    model = load_or_create(
        cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels, seed=cfg.seed
    )
    check_forward(model, loaders, f"model {cfg.model!r}", cfg.dataset)
    with run.started():
        only_main(write_run_files)(out_dir, cfg, device, resume)
        start = time.perf_counter()
        history = _fit(
            model,
            loaders,
            cfg,
            seed=cfg.seed,
            device=device,
            checkpoint=out_dir / TRAIN_CHECKPOINT,
            resume=resume,
            progress=progress,
            validate=True,
            l1_bn=cfg.l1_bn,
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
    progress: TrainProgress | None,
) -> Callable[[nn.Module, int], None]:
    def finetune(model: nn.Module, round_index: int) -> None:
        if cfg.bn_recalibration_batches != 0:
            reseed_loader(loaders.train, seed * 7919 + round_index)
            recalibrate_bn(
                model, loaders.train, batches=cfg.bn_recalibration_batches, device=device
            )
        if cfg.epochs == 0:
            return
        _fit(
            model,
            loaders,
            cfg,
            seed=seed + round_index,
            device=device,
            checkpoint=_finetune_checkpoint(out_dir, round_index),
            resume=True,
            progress=progress,
        )

    return finetune


def _finetune_checkpoint(out_dir: Path, round_index: int) -> Path:
    return out_dir / ROUNDS_DIR / f"finetune_{round_index}.pt"


def run_prune(
    cfg: PruneConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    log: Log = print,
    progress: TrainProgress | None = None,
) -> dict[str, Any]:
    """Prune a model (a registry name, or a directory written by ``save_model``).

    ``allow_pickle`` lets a legacy ``torch.save`` checkpoint load (unpickling runs its
    code); it is an argument, never part of ``cfg``, so no file can switch it on.
    ``progress`` follows the fine-tuning epochs (on the main rank; default: nothing)."""
    with claimed(out, force, resume, log, progress is not None) as run:
        return run.done if run.done is not None else _prune(cfg, run, allow_pickle, progress)


def _prune(
    cfg: PruneConfig, run: Run, allow_pickle: bool, progress: TrainProgress | None
) -> dict[str, Any]:
    out_dir, log, resume = run.out_dir, run.log, run.resume
    progress = progress if run.progress else None
    cfg = absolute_paths(cfg)
    methods = available_methods()
    if cfg.method not in methods:
        raise ConfigError(unknown_name("method", cfg.method, methods))
    if not resume:
        check_checkpoint_outside(cfg, out_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    loaders = _loaders(cfg)
    spec = loaders.spec
    input_shape = (1, *spec.input_shape)
    original = source_model(cfg, spec.num_classes, spec.in_channels, log, allow_pickle)
    what = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else f"model {cfg.model!r}"
    check_forward(original, loaders, what, cfg.dataset)
    _check_prunable(original, cfg.method, input_shape, cfg.exclude)
    source = on_main(source_digest, cfg, out_dir, resume, log)
    finished, state = last_finished_round(out_dir) if resume else (0, {})
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
            exclude=cfg.exclude,
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
        after_acc = _accuracy(result.model, loaders, device)
        metrics = prune_metrics(reference, result.after, before_acc, after_acc, rounds_done)
        only_main(_write_result)(out_dir, result.model, metrics)
    return metrics


def _round_record(
    info: RoundInfo, model: nn.Module, loaders: Loaders, device: torch.device
) -> dict[str, Any]:
    record = asdict(info)
    record["detail"] = {k: v for k, v in info.detail.items() if k != "forms"}
    record["val_acc"] = evaluate(model, loaders.val, device=device).accuracy
    return record
