"""The default job (``make run``): train, prune with EigenDamage, print the result.

A VGG-style net (288k parameters) is trained on scikit-learn's 8x8 digits (embedded, no
download) and pruned over 3 EigenDamage rounds with fine-tuning to 15% of its parameters.
Validation accuracy is what the run looks at; the test split is reported once, at the end.
"""

from __future__ import annotations

from pathlib import Path

from .config import FineTuneConfig, PruneConfig, TrainConfig
from .io import lock_output_dir, prepare_output_dir
from .report import print_table
from .runner import Log, run_prune, run_train, summary_rows

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
DEMO_PRUNE = dict(
    dataset="digits",
    method="eigendamage",
    target_params=0.15,
    rounds=3,
    batch_size=64,
    device="cpu",
    finetune=FineTuneConfig(epochs=10, lr=0.01, schedule="cosine"),
)


def run_demo(
    out: str | Path, *, force: bool = False, seed: int = 0, log: Log = print, progress: bool = True
) -> dict:
    out_dir = prepare_output_dir(out, force=force)
    with lock_output_dir(out_dir):  # a second demo on the same --out is refused at once
        return _demo(out_dir, seed, log, progress)


def _demo(out_dir: Path, seed: int, log: Log, progress: bool) -> dict:
    log("1/2 training digits-vgg on the embedded digits data ...")
    run_train(
        TrainConfig(**DEMO_TRAIN, seed=seed),
        out_dir / "train",
        force=True,
        log=log,
        progress=progress,
    )
    log("2/2 pruning with EigenDamage: 3 rounds to 15% of the parameters ...")
    cfg = PruneConfig(**DEMO_PRUNE, checkpoint=str(out_dir / "train" / "model"), seed=seed)
    metrics = run_prune(cfg, out_dir / "prune", force=True, log=log, progress=progress)
    print_table(summary_rows(metrics), title="EigenDamage on digits (digits-vgg)")
    log(f"results: {out_dir / 'prune' / 'metrics.json'}")
    return metrics
