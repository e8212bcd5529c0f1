"""`eigendamage train`, `prune` and `demo`: the jobs of :mod:`eigendamage.runner` and
:mod:`eigendamage.demo`, with their progress drawn here."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import PruneConfig, TrainConfig
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
    RunForce,
    RunOut,
    RunResume,
    Seed,
    names,
    with_default,
)
from .progress import bars
from .tables import print_table

# Every option named after a config field sets that field (`run_config`, the table in
# `options.overrides`): `--ratio 0.5` becomes `PruneConfig.ratio`, which the runner passes
# on as `run_pruning(ratio=cfg.ratio)`; --config/--out/--resume/--force, --allow-pickle and
# --no-progress are the command's own.


@app.command("train")
@friendly_errors
def train_cmd(
    ctx: typer.Context,
    model: str = typer.Option(
        None, help="model name (required, here or in --config; see `eigendamage models`)"
    ),
    data: Data = None,
    data_root: DataRoot = None,
    epochs: int = typer.Option(None, help=with_default(TrainConfig, "epochs", "training epochs")),
    lr: float = typer.Option(None, help=with_default(TrainConfig, "lr", "learning rate")),
    batch_size: BatchSize = None,
    weight_decay: float = typer.Option(
        None, help=with_default(TrainConfig, "weight_decay", "SGD weight decay")
    ),
    schedule: str = typer.Option(
        None, help=with_default(TrainConfig, "schedule", "step | cosine | constant")
    ),
    l1_bn: float = typer.Option(
        None, help=with_default(TrainConfig, "l1_bn", "L1 on BN scales (Network Slimming)")
    ),
    seed: Seed = None,
    device: Device = None,
    config: Path = typer.Option(None, help="JSON/TOML TrainConfig"),
    out: RunOut = None,
    resume: RunResume = None,
    force: RunForce = False,
    no_progress: NoProgress = False,
) -> None:
    """Train a model from scratch and save it (the checkpoint to prune)."""
    from ..runner import run_train

    cfg, out_dir, resuming = run_config(TrainConfig, ctx)
    run_train(cfg, out_dir, force=force, resume=resuming, log=log, progress=bars(no_progress))


@app.command("prune")
@friendly_errors
def prune_cmd(
    ctx: typer.Context,
    model: str = typer.Option(
        None, help="model name: an untrained model, or the architecture of a state_dict file"
    ),
    checkpoint: str = typer.Option(None, help="model directory written by `train`/`prune`"),
    allow_pickle: AllowPickle = False,
    data: Data = None,
    data_root: DataRoot = None,
    method: str = typer.Option(
        None,
        help="the pruning method (required, here or in --config): eigendamage, c-obd, c-obs, "
        "kron-obd, kron-obs, ... (see `eigendamage methods`)",
    ),
    ratio: float = typer.Option(
        None, help="fraction of units removed per round (give one of the three budgets)"
    ),
    target_params: float = typer.Option(None, help="fraction of parameters kept at the end"),
    target_flops: float = typer.Option(None, help="fraction of FLOPs kept at the end"),
    rounds: int = typer.Option(
        None, help=with_default(PruneConfig, "rounds", "prune -> fine-tune rounds")
    ),
    per_layer_cap: PerLayerCap = None,
    exclude: Exclude = None,
    fisher: Fisher = None,
    fisher_batches: FisherBatches = None,
    damping: Damping = None,
    normalize: bool = typer.Option(
        None,
        "--normalize/--no-normalize",
        help="channel criteria: divide each layer's scores by their sum (default: off)",
    ),
    finetune_epochs: FinetuneEpochs = None,
    finetune_lr: FinetuneLr = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    device: Device = None,
    config: Path = typer.Option(
        None, help="JSON/TOML PruneConfig: the keys of a run's config.json; options override it"
    ),
    out: RunOut = None,
    resume: RunResume = None,
    force: RunForce = False,
    no_progress: NoProgress = False,
) -> None:
    """Prune a model; writes config, metrics and the pruned model into --out."""
    from ..distributed import is_main
    from ..reported import NONZERO_NOTE, method_label, sparse_params, summary_rows
    from ..runner import run_prune

    cfg, out_dir, resuming = run_config(
        PruneConfig, ctx, replace={"exclude": names("--exclude", exclude)}
    )
    metrics = run_prune(
        cfg,
        out_dir,
        force=force,
        resume=resuming,
        allow_pickle=allow_pickle,
        log=log,
        progress=bars(no_progress),
    )
    if is_main():  # under torchrun every rank returns the same metrics: print them once
        shown = sparse_params(metrics)
        note = f" ({NONZERO_NOTE})" if shown is not metrics else ""
        print_table(summary_rows(shown), title=f"{method_label(cfg)}: {out_dir}{note}")


@app.command("demo")
@friendly_errors
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="run directory"),
    force: bool = typer.Option(False, "--force", help="write into an existing --out"),
    seed: int = typer.Option(0, min=0),
    no_progress: NoProgress = False,
) -> None:
    """The default job: train a VGG-style net on the embedded digits data, prune it with
    EigenDamage over 3 rounds with fine-tuning, and print accuracy/params/FLOPs."""
    from ..demo import DEMO_TITLE, PRUNE_DIR, run_demo
    from ..reported import summary_rows

    metrics = run_demo(out, force=force, seed=seed, log=log, progress=bars(no_progress))
    print_table(summary_rows(metrics), title=DEMO_TITLE)
    log(f"results: {out / PRUNE_DIR / 'metrics.json'}")
