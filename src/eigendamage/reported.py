"""What result tables report for a run, shared by ``prune``'s summary and ``compare``.

Why a module of its own: two reporting rules must read the same in every table --
a normalised channel criterion is labelled ``NAME+norm``, and weight-level obd/obs count
the parameters they left non-zero (their model keeps its dense shapes, so the dense count
would show 0 % removed).  FLOPs stay dense: zeros in a dense layer save no time unless a
sparse kernel runs them.
"""

from __future__ import annotations

from typing import Any

from .config import NORM_SUFFIX, PruneConfig

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
