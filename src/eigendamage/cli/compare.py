"""`eigendamage compare`: methods x budgets on one model (:mod:`eigendamage.compare`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import CompareConfig, TrainConfig, load_config
from ..errors import ConfigError
from .app import app, friendly_errors, log, run_config
from .options import (
    AllowPickle,
    BatchSize,
    Damping,
    Data,
    DataRoot,
    Device,
    Exclude,
    FinetuneEpochs,
    FinetuneLr,
    Fisher,
    FisherBatches,
    NoProgress,
    PerLayerCap,
    Seed,
    names,
    with_default,
)
from .progress import bars
from .tables import print_table

DEFAULT_MODEL = "digits-vgg"


def _floats(option: str, text: str | None) -> list[float] | None:
    """``"0.3,0.5"`` -> ``[0.3, 0.5]``; a clear error for anything else."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--{option}: expected numbers separated by commas, got {text!r}"
        ) from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


@app.command("compare")
@friendly_errors
def compare_cmd(
    ctx: typer.Context,
    model: str = typer.Option(None, help=f"model name, trained first (default: {DEFAULT_MODEL})"),
    checkpoint: str = typer.Option(None, help="trained model directory (instead of --model)"),
    allow_pickle: AllowPickle = False,
    data: Data = None,
    data_root: DataRoot = None,
    methods: str = typer.Option(None, help="comma-separated methods (default: all)"),
    ratios: str = typer.Option(None, help="comma-separated pruning ratios, e.g. 0.3,0.5,0.7"),
    target_params: str = typer.Option(None, help="comma-separated fractions of params kept"),
    target_flops: str = typer.Option(None, help="comma-separated fractions of FLOPs kept"),
    rounds: int = typer.Option(
        None, help=with_default(CompareConfig, "rounds", "prune -> fine-tune rounds per run")
    ),
    per_layer_cap: PerLayerCap = None,
    exclude: Exclude = None,
    fisher: Fisher = None,
    fisher_batches: FisherBatches = None,
    damping: Damping = None,
    finetune_epochs: FinetuneEpochs = None,
    finetune_lr: FinetuneLr = None,
    train_epochs: int = typer.Option(None, help="train --model for N epochs first"),
    batch_size: BatchSize = None,
    seed: Seed = None,
    device: Device = None,
    config: Path = typer.Option(None, help="JSON/TOML CompareConfig (e.g. configs/one_pass/...)"),
    out: Path = typer.Option(None, help="comparison directory to create"),
    resume: Path = typer.Option(None, help="continue the comparison in this directory"),
    force: bool = typer.Option(
        False, "--force", help="write into an existing --out, redoing every run"
    ),
    no_progress: NoProgress = False,
) -> None:
    """Prune one model with several methods at several budgets; writes results.csv/.md and
    accuracy-vs-params/FLOPs plots into --out (finished runs are kept on --resume)."""
    from ..compare import TRAIN_CONFIG, run_compare
    from ..methods import available_methods
    from ..report import markdown_rows

    # The options named after config fields reach the config through `run_config`; these
    # four are parsed from their comma-separated text first.
    parsed = {
        "methods": _names(methods),
        "ratios": _floats("ratios", ratios),
        "target_params": _floats("target-params", target_params),
        "target_flops": _floats("target-flops", target_flops),
        "exclude": names("--exclude", exclude),
    }
    if resume is None and config is None:  # the digits defaults
        parsed["methods"] = parsed["methods"] or available_methods()
        if model is None and checkpoint is None:
            parsed["model"] = DEFAULT_MODEL
    if resume is not None and train_epochs is not None:
        raise ConfigError(
            f"--resume {resume} continues with its own {TRAIN_CONFIG}; drop --train-epochs"
        )
    cfg, out_dir, resuming = run_config(CompareConfig, ctx, replace=parsed)
    if resuming:
        train_file = out_dir / TRAIN_CONFIG
        train = load_config(train_file, TrainConfig) if train_file.is_file() else None
    else:
        train = _train_config(cfg, train_epochs)
    rows = run_compare(
        cfg,
        out_dir,
        train=train,
        force=force,
        resume=resuming,
        allow_pickle=allow_pickle,
        log=log,
        progress=bars(no_progress),
    )
    table = markdown_rows(rows)
    compact = [c for c in table[0] if c not in ("params", "FLOPs", "note")]  # errors were logged
    print_table(table, title=f"compare: {out_dir}", columns=compact)


def _train_config(cfg: CompareConfig, epochs: int | None) -> TrainConfig | None:
    """The training run ``--train-epochs`` asks for (the registry model, trained on the
    comparison's dataset with the default recipe)."""
    if epochs is None:
        return None
    if cfg.model is None or cfg.checkpoint is not None:
        raise ConfigError("--train-epochs trains a --model by name; it cannot train a --checkpoint")
    shared = cfg.model_dump(
        include={"model", "dataset", "data_root", "batch_size", "seed", "device"}
    )
    return TrainConfig.model_validate({**shared, "epochs": epochs})
