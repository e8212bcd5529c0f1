"""What a run reports: a prune run's ``metrics.json``, and what result tables show of it,
shared by ``prune``'s summary and ``compare``.

Why a module of its own: two reporting rules must read the same in every table --
a normalised channel criterion is labelled ``NAME+norm``, and weight-level obd/obs count
the parameters they left non-zero (their model keeps its dense shapes, so the dense count
would show 0 % removed).  FLOPs stay dense: zeros in a dense layer save no time unless a
sparse kernel runs them.
"""

from __future__ import annotations

from typing import Any

from .config import NORM_SUFFIX, PruneConfig
from .measure import Counts, reduction

NONZERO_NOTE = "params: non-zero weights (FLOPs dense)"


def method_label(cfg: PruneConfig) -> str:
    """The method as tables show it: ``c-obd+norm`` for c-obd with ``normalize``."""
    return cfg.method + (NORM_SUFFIX if cfg.normalize else "")


def sparse_params(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with ``after.params`` and ``params_removed`` counting the non-zero
    parameters when the run zeroed weights (obd/obs: ``params_nonzero`` of its last round;
    fine-tuning keeps those zeros) and the dense count kept as ``after.params_dense``;
    other runs are returned unchanged."""
    rounds = metrics.get("rounds") or []
    nonzero = rounds[-1].get("detail", {}).get("params_nonzero") if rounds else None
    if nonzero is None:
        return metrics
    after = metrics["after"]
    return {
        **metrics,
        "after": {**after, "params": nonzero, "params_dense": after["params"]},
        "params_removed": 1 - nonzero / metrics["before"]["params"],
    }


def prune_metrics(
    reference: Counts,
    after: Counts,
    before_acc: dict[str, float],
    after_acc: dict[str, float],
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    """A finished prune run's ``metrics.json``.

    Args:
        reference: params and FLOPs of the unpruned model.
        after: those of the pruned model.
        before_acc: ``val_acc`` and ``test_acc`` of the unpruned model.
        after_acc: those of the pruned (fine-tuned) model.
        rounds: the rounds' records (each with its ``seconds`` per stage).

    Returns:
        Before and after, the fractions removed, the test accuracy change, the rounds and
        the seconds per stage summed over them.
    """
    removed = reduction(reference, after)
    return {
        "before": {**before_acc, "params": reference.params, "flops": reference.flops},
        "after": {**after_acc, "params": after.params, "flops": after.flops},
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
