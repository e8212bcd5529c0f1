"""The default job (``make run``): train, then prune with EigenDamage.

A VGG-style net (288k parameters) is trained on scikit-learn's 8x8 digits (embedded, no
download) and pruned over 3 EigenDamage rounds with fine-tuning to 15% of its parameters.
Validation accuracy is what the run looks at; the test split is reported once, at the end
(the CLI prints it as :data:`DEMO_TITLE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import FineTuneConfig, PruneConfig, TrainConfig
from .io import lock_output_dir, prepare_output_dir
from .runner import Log, run_prune, run_train
from .train import TrainProgress

DEMO_TITLE = "EigenDamage on digits (digits-vgg)"
TRAIN_DIR, PRUNE_DIR = "train", "prune"


# The recipes as plain settings (tests shorten them); each run adds its seed and source.
DEMO_TRAIN = dict(
    model="digits-vgg",
    dataset="digits",
    epochs=30,
    lr=0.05,
    batch_size=64,
    schedule="cosine",
    weight_decay=5e-4,
    device="cpu",
)
DEMO_PRUNE = dict(  # on the training run's data, batch size and device
    dataset=DEMO_TRAIN["dataset"],
    method="eigendamage",
    target_params=0.15,
    rounds=3,
    batch_size=DEMO_TRAIN["batch_size"],
    device=DEMO_TRAIN["device"],
    finetune=FineTuneConfig(epochs=10, lr=0.01, schedule="cosine"),
)


def run_demo(
    out: str | Path,
    *,
    force: bool = False,
    seed: int = 0,
    log: Log = print,
    progress: TrainProgress | None = None,
) -> dict[str, Any]:
    """Train into ``OUT/train``, prune that model into ``OUT/prune``; returns the prune
    run's metrics (``OUT/prune/metrics.json``)."""
    out_dir = prepare_output_dir(out, force=force)
    with lock_output_dir(out_dir):  # a second demo on the same --out is refused at once
        return _demo(out_dir, seed, log, progress)


def _demo(out_dir: Path, seed: int, log: Log, progress: TrainProgress | None) -> dict[str, Any]:
    log("1/2 training digits-vgg on the embedded digits data ...")
    train = TrainConfig(**DEMO_TRAIN, seed=seed)
    run_train(train, out_dir / TRAIN_DIR, force=True, log=log, progress=progress)
    log("2/2 pruning with EigenDamage: 3 rounds to 15% of the parameters ...")
    cfg = PruneConfig(**DEMO_PRUNE, checkpoint=str(out_dir / TRAIN_DIR / "model"), seed=seed)
    return run_prune(cfg, out_dir / PRUNE_DIR, force=True, log=log, progress=progress)
