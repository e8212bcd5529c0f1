"""How channel scores become one ranking (a budget then picks a point on it:
:mod:`eigendamage.methods.budget`).

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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
