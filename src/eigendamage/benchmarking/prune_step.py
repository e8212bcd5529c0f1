"""The seconds of one EigenDamage round per stage (``eigendamage bench prune-step``)."""

from __future__ import annotations

from collections.abc import Sequence

from ..methods import run_pruning
from .workloads import build, load_now, synthetic_batches


def bench_prune_step(
    key: str = "vgg19-cifar",
    *,
    batches: int = 20,
    batch_sizes: Sequence[int] = (128,),
    ratio: float = 0.5,
    device: str = "cpu",
) -> list[dict]:
    """One EigenDamage round (K-FAC on ``batches`` batches, eigh, scoring, surgery) with the
    per-stage seconds that :func:`eigendamage.pruner.run_pruning` records."""
    rows = []
    for bs in batch_sizes:
        model, w = build(key, device, batch_size=bs)
        data = synthetic_batches(w, batches, device)
        result = run_pruning(
            model,
            data,
            method="eigendamage",
            ratio=ratio,
            fisher_batches=batches,
            input_shape=(1, *w.input_shape),
            device=device,
        )
        sec = result.rounds[0].seconds
        other = sec["prune"] - sum(v for k, v in sec.items() if k != "prune")
        rows.append(
            {
                "workload": key,
                "batch": bs,
                "batches": batches,
                **{f"{k} s": f"{v:.1f}" for k, v in sec.items() if k != "prune"},
                "other s": f"{other:.1f}",
                "total s": f"{sec['prune']:.1f}",
                "params kept": f"{result.params_kept:.2f}",
                "load avg": load_now(),
                "under 60 s": "yes" if sec["prune"] < 60 else "no",
            }
        )
    return rows
