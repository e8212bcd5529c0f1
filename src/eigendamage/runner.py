"""Jobs behind the CLI: train a model, prune it, and the default demo.

Each job writes into its own directory: ``config.json`` (resolved), ``environment.json``
(versions, git commit), ``metrics.json`` and the model (``model/``: safetensors + JSON).
Long jobs checkpoint at round and epoch boundaries (atomically) and continue with
``resume=True`` from the last finished boundary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FineTuneConfig, PruneConfig, TrainConfig, config_to_dict
from .data import Loaders, make_loaders
from .errors import ConfigError
from .io import atomic_write_json, load_model, prepare_output_dir, save_model
from .measure import Counts, count, reduction
from .models import create_model
from .pruner import PruneResult, RoundInfo, run_pruning
from .seeding import environment_info, seed_everything
from .train import evaluate, recalibrate_bn, reseed_loader, train

Log = Callable[[str], None]
ROUNDS_DIR = "rounds"
STATE_FILE = "state.json"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def _loaders(cfg: TrainConfig | PruneConfig) -> Loaders:
    return make_loaders(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size, seed=cfg.seed)


def _write_run_files(out: Path, cfg: Any) -> None:
    atomic_write_json(out / "config.json", config_to_dict(cfg))
    atomic_write_json(out / "environment.json", environment_info())


def _accuracy(model: nn.Module, loaders: Loaders, device: torch.device) -> dict[str, float]:
    return {
        "val_acc": evaluate(model, loaders.val, device=device).accuracy,
        "test_acc": evaluate(model, loaders.test, device=device).accuracy,
    }


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
    out_dir = prepare_output_dir(out, force=force, resume=resume)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    loaders = _loaders(cfg)
    spec = loaders.spec
    model = create_model(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    _write_run_files(out_dir, cfg)
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
        checkpoint_path=out_dir / "train_checkpoint.pt",
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
    save_model(model.cpu(), out_dir / "model")
    atomic_write_json(out_dir / "metrics.json", metrics)
    log(f"trained {cfg.model}: val {metrics['val_acc']:.4f}, test {metrics['test_acc']:.4f}")
    return metrics


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
            checkpoint_path=out_dir / ROUNDS_DIR / f"finetune_{round_index}.pt",
            resume=True,
            progress=progress,
        )

    return finetune


def _last_finished_round(out_dir: Path) -> tuple[int, dict[str, Any]]:
    state_file = out_dir / ROUNDS_DIR / STATE_FILE
    if not state_file.is_file():
        return 0, {}
    state = json.loads(state_file.read_text())
    return int(state["finished_rounds"]), state


def run_prune(
    cfg: PruneConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    log: Log = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune a model (a registry name, or a directory written by ``save_model``)."""
    out_dir = prepare_output_dir(out, force=force, resume=resume)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    loaders = _loaders(cfg)
    spec = loaders.spec
    input_shape = (1, *spec.input_shape)
    if cfg.checkpoint is not None:
        original = load_model(cfg.checkpoint)
    else:
        original = create_model(
            cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels
        )
        log(f"warning: pruning an untrained {cfg.model}; pass --checkpoint for a trained one")
    original = original.to(device)
    finished, state = _last_finished_round(out_dir) if resume else (0, {})
    _write_run_files(out_dir, cfg)
    reference = count(original, input_shape)
    model = original
    if finished:
        model = load_model(out_dir / ROUNDS_DIR / f"round_{finished}").to(device)
        log(f"resuming after round {finished} of {cfg.rounds}")
    before_acc = state.get("before") or _accuracy(original, loaders, device)
    rounds_done: list[dict[str, Any]] = list(state.get("rounds", []))

    def on_round(pruned: nn.Module, info: RoundInfo) -> None:
        save_model(pruned, out_dir / ROUNDS_DIR / f"round_{info.round}")
        rounds_done.append(_round_record(info, pruned, loaders, device))
        atomic_write_json(
            out_dir / ROUNDS_DIR / STATE_FILE,
            {"finished_rounds": info.round, "before": before_acc, "rounds": rounds_done},
        )

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
    save_model(result.model.cpu(), out_dir / "model")
    atomic_write_json(out_dir / "metrics.json", metrics)
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
