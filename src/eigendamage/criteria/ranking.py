"""How channel scores become one ranking, and how a budget picks a point on it.

* :func:`normalized`: the original code's ``normalize`` option -- each layer's scores
  divided by that layer's sum, so every layer's scores add up to 1 and the global
  threshold compares *shares* of a layer instead of loss increases (off by default: the
  paper's protocol, and the original authors found it usually hurts).
* :func:`layer_fractions`: per-layer ranking (Li et al., 2017) expressed as a global one.
  A unit whose score is the ``j``-th lowest of its set of ``n`` gets ``j / n``, so the
  ``k`` lowest units overall remove the same fraction of every set (up to one unit of
  rounding), each set losing its own lowest-scoring units.  Why this form: the global
  machinery (caps, monotone bisection for a budget, one channel per step) then applies
  unchanged, and a budget can still land within 1 %.
* :func:`solve_steps` (channel methods: a number of ranked units) and :func:`solve_ratio`
  (EigenDamage: a ratio of eigen-directions) meet a params/FLOPs budget within 1 %, or,
  when the units are too coarse for that, take the nearest model at or under the target
  and say so in one log line: a budget is a ceiling, and a near miss is no reason to fail
  a long run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..measure import count

logger = logging.getLogger("eigendamage")


def normalized(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each set's scores divided by their sum (a set summing to 0 is left as is)."""
    out = {}
    for key, s in scores.items():
        total = s.sum()
        out[key] = s / total if total > 0 else s
    return out


def layer_fractions(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``j / n`` for the unit with the ``j``-th lowest score (1-based, ties by position) of
    a set of ``n``: the scores of a per-layer ranking (see the module docstring)."""
    out = {}
    for key, s in scores.items():
        flat = s.detach().flatten().to("cpu", torch.float64)
        ranks = torch.empty_like(flat)
        ranks[torch.argsort(flat, stable=True)] = torch.arange(1, len(flat) + 1).double()
        out[key] = (ranks / max(1, len(flat))).reshape(s.shape)
    return out


def solve_steps(
    kept: Callable[[int], float], total: int, target: float, tol: float, what: str, cap: float
) -> tuple[int, float]:
    """``(k, kept(k))``: ``k`` units removed for a kept fraction ``target`` of ``what``.

    ``kept`` is non-increasing in ``k`` (see :class:`~.base.GlobalRanking`).  Within
    ``tol`` of the target, the closest ``k``; when no ``k`` is (the units are too coarse),
    the nearest model at or under the target, with one log line saying what it reached.
    Only a target below what pruning to the caps reaches is a :class:`ConfigError`.
    """
    cache: dict[int, float] = {}

    def f(k: int) -> float:
        if k not in cache:
            cache[k] = kept(k)
        return cache[k]

    if f(total) > target * (1 + tol):
        raise ConfigError(
            f"target_{what}={target:g} is unreachable with per_layer_cap={cap:g}: at most "
            f"{1 - f(total):.4f} of the {what} can be removed (kept fraction {f(total):.4f}); "
            "raise per_layer_cap or the target"
        )
    lo, hi = 0, total  # invariant: f(lo) > target >= f(hi), unless f(total) is above target
    if f(hi) > target:
        return hi, f(hi)
    if f(lo) <= target:
        return lo, f(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: abs(f(k) / target - 1))
    if abs(f(best) / target - 1) > tol:
        best = hi  # the nearest model at or under the target
        logger.warning(
            f"target_{what}={target:g} cannot be met within {100 * tol:g}% (one unit apart: kept "
            f"{f(lo):.4f} or {f(hi):.4f}); took the nearest model under it, {f(hi):.4f} kept "
            f"({f(hi) / target:.3f} of the target)"
        )
    return best, f(best)


def solve_ratio(
    build: Callable[[float], nn.Module],
    target: tuple[str, float],
    input_shape: tuple[int, ...],
    *,
    tolerance: float = 0.01,
    max_ratio: float = 0.999,
    steps: int = 30,
) -> float:
    """Bisection on the pruning ratio until params/FLOPs are within ``tolerance`` (relative)
    of the target count, else the ratio of the nearest model at or under it (logged); a
    clear error when the caps make the target unreachable."""
    metric, goal = target

    def measure(r: float) -> float:
        return getattr(count(build(r), input_shape), metric)

    lo, hi = 0.0, max_ratio
    at_hi = measure(hi)
    if at_hi > goal * (1 + tolerance):
        raise ConfigError(
            f"target {metric} {goal:,.0f} is unreachable: pruning as far as the per-layer cap "
            f"allows leaves {at_hi:,.0f}; raise per_layer_cap or use more rounds"
        )
    best_r, best_err = hi, abs(at_hi - goal) / goal
    under = (hi, at_hi) if at_hi <= goal else None  # the largest count at or under the goal
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        value = measure(mid)
        err = abs(value - goal) / goal
        if err < best_err:
            best_r, best_err = mid, err
        if err <= tolerance:
            return mid
        if value > goal:
            lo = mid
        else:
            hi = mid
            if under is None or value > under[1]:
                under = (mid, value)
    if under is not None:  # always, here: at_hi > goal would be within tolerance
        best_r = under[0]
        logger.warning(
            f"target {metric} {goal:,.0f} cannot be met within {100 * tolerance:g}%; took the "
            f"nearest model under it, {under[1]:,.0f} ({under[1] / goal:.3f} of the target)"
        )
    return best_r
