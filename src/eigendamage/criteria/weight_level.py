"""Weight-level OBD / OBS under K-FAC: unstructured sparsity, the paper's weight baselines.

For weight ``q = (i, j)`` (output ``i``, input coordinate ``j`` of ``W = weight.flatten(1)``)
with ``H ~= A (x) S``:

* OBD: ``Delta L_q = 1/2 theta_q^2 H_qq``, ``H_qq = A_jj S_ii`` (or the exact diagonal
  Fisher ``F_ij`` with ``diag=True``).  Undamped: no inverse is involved.
* OBS: ``Delta L_q = theta_q^2 / (2 [H^-1]_qq)``, ``[H^-1]_qq = [A^-1]_jj [S^-1]_ii`` (damped
  inverses); update ``theta <- theta - sum_q theta_q H^-1 e_q / [H^-1]_qq`` over the pruned
  set, i.e. ``Delta W = -S^-1 C A^-1`` with ``C = W / [H^-1]`` on pruned weights and 0
  elsewhere.  This sums single-weight OBS updates (exact for one weight, an approximation
  for many), and may also move the bias (the homogeneous coordinate); pruned weights are
  then set to exactly 0.

One global threshold ranks all weights of all layers (biases are never pruned), capped per
layer.  The result keeps its shapes: it is reported as sparsity, not as smaller layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..curvature.factors import KFactors
from ..curvature.hooks import DataPass
from ..curvature.types import FisherType
from ..errors import ConfigError
from ..surgery.channels import apply_weight_update_
from .amounts import check_fraction
from .base import GlobalRanking, collect_factors
from .channel_hessian import factor_blocks, inverse_diag, kron_inverses, layer_matrix

WEIGHT_METHODS = ("obd", "obs")


def weight_scores(
    model: nn.Module,
    factors: Mapping[str, KFactors],
    method: str,
    *,
    damping: float = 1e-3,
    diag: bool = False,
) -> dict[str, torch.Tensor]:
    """``Delta L`` of zeroing each weight alone, shaped like each layer's ``weight``."""
    out = {}
    for name, f in factors.items():
        module = model.get_submodule(name)
        w = layer_matrix(module, f)
        if method == "obd" and diag:
            h = f.extra["diag"].to(w.device, torch.float64).reshape(w.shape)
            s = 0.5 * w**2 * h
        elif method == "obd":
            a, sf = factor_blocks(f)
            h = sf.diagonal(dim1=-2, dim2=-1)[..., None] * a.diagonal(dim1=-2, dim2=-1)[:, None]
            s = 0.5 * w**2 * h
        else:
            s = 0.5 * w**2 / inverse_diag(*kron_inverses(f, damping, name))
        out[name] = _drop_bias(s, f).reshape(module.weight.shape)
    return out


def obs_weight_update(
    model: nn.Module,
    factors: Mapping[str, KFactors],
    pruned: Mapping[str, torch.Tensor],
    *,
    damping: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """``Delta W = -S^-1 C A^-1`` per layer for the boolean ``pruned`` weight masks."""
    out = {}
    for name, mask in pruned.items():
        f = factors[name]
        w = layer_matrix(model.get_submodule(name), f)
        a_inv, s_inv = kron_inverses(f, damping, name)
        sel = mask.reshape(len(mask), -1).to(w.device)
        if f.has_bias:
            sel = torch.cat([sel, sel.new_zeros(len(sel), 1)], dim=1)
        c = torch.where(sel.reshape(w.shape), w / inverse_diag(a_inv, s_inv), 0.0)
        out[name] = (-(s_inv @ c @ a_inv)).reshape(-1, w.shape[-1])
    return out


def weight_prune(
    model: nn.Module,
    loader: Iterable | None,
    method: str,
    ratio: float,
    *,
    factors: Mapping[str, KFactors] | None = None,
    modules: Iterable[str] | None = None,
    diag: bool = False,
    per_layer_cap: float = 0.95,
    fisher: FisherType = "true",
    fisher_batches: int | None = None,
    fisher_samples: int = 1,
    damping: float = 1e-3,
    obs_update: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, dict]:
    """Zero the ``ratio`` fraction of weights with the lowest ``Delta L`` (one threshold).

    Returns ``(model copy with zeros, info)``; ``info["masks"][layer]`` is True where a
    weight is kept, ``info["sparsity"]`` the achieved fraction of zeroed weights (below
    ``ratio`` when a layer hits ``per_layer_cap``).  ``obs_update=False`` skips the OBS
    update.  ``factors`` (from ``collect_kfac``) skips the curvature pass; ``modules``
    restricts pruning to those layers (default: every layer with factors).
    """
    if method not in WEIGHT_METHODS:
        raise ConfigError(f"weight-level method must be one of {WEIGHT_METHODS}, got {method!r}")
    if diag and method != "obd":
        raise ConfigError("diag=True (diagonal Fisher) applies to method 'obd' only")
    check_fraction("ratio", ratio, open_low=False, open_high=False)
    check_fraction("per_layer_cap", per_layer_cap, open_low=False, open_high=False)
    modules = None if modules is None else list(modules)
    if factors is None:
        data = DataPass(fisher, fisher_batches, fisher_samples, seed, device)
        factors = collect_factors(model, loader, data, modules, needed_by=method, diag=diag)
    if modules is not None:
        missing = [n for n in modules if n not in factors]
        if missing:
            raise ConfigError(f"no K-FAC factors for layers {missing}; collect them first")
        factors = {n: factors[n] for n in modules}
    scores = weight_scores(model, factors, method, damping=damping, diag=diag)
    ranking = GlobalRanking(
        scores, {n: math.floor(per_layer_cap * s.numel()) for n, s in scores.items()}
    )
    k = math.floor(ratio * ranking.total)
    removed = ranking.removed(k)
    pruned = {}
    for name, idx in removed.items():
        mask = torch.zeros(scores[name].numel(), dtype=torch.bool)
        mask[idx] = True
        pruned[name] = mask.reshape(scores[name].shape)
    result = copy.deepcopy(model)
    if method == "obs" and obs_update:
        apply_weight_update_(result, obs_weight_update(model, factors, pruned, damping=damping))
    masks = {}
    with torch.no_grad():
        for name, s in scores.items():
            weight = result.get_submodule(name).weight
            keep = ~pruned.get(name, torch.zeros(s.shape, dtype=torch.bool))
            weight.mul_(keep.to(weight.device, weight.dtype))
            masks[name] = keep
    zeroed = sum(int(m.numel() - m.sum()) for m in masks.values())
    info = {
        "method": method,
        "masks": masks,
        "sparsity": zeroed / max(1, ranking.total),
        "per_layer_sparsity": {n: 1 - m.double().mean().item() for n, m in masks.items()},
        "threshold": ranking.threshold(k),
        "pruned_weights": zeroed,
        "total_weights": ranking.total,
    }
    return result, info


def _drop_bias(t: torch.Tensor, f: KFactors) -> torch.Tensor:
    """``(groups, out/groups, d)`` -> ``(out, d)`` without the bias column."""
    t = t.reshape(-1, t.shape[-1])
    return t[:, :-1] if f.has_bias else t
