"""One-shot channel pruning with the baseline criteria (C-OBD, C-OBS, Kron-OBD/OBS, ...).

``model -> coupled channel groups -> curvature the criterion needs -> per-channel scores ->
one global threshold (capped per group) -> OBS update (if any) -> physical removal``.

The amount to prune is either ``ratio`` (the fraction of prunable channels removed, as the
paper's "pruning ratio") or a budget ``target_params`` / ``target_flops`` (the fraction of
the model's parameters / FLOPs KEPT), for which the global threshold is found by bisection
over the sorted scores.  Criteria with ``ranking = "layer"`` (``l1``) remove the same
fraction of every group instead (see :mod:`.criteria.ranking`); ``normalize`` divides each
layer's scores by their sum before ranking, as the original code's option did.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .criteria import ScoreContext, get_criterion
from .criteria.base import GlobalRanking
from .criteria.eigendamage import MAX_SIDE
from .criteria.ranking import layer_fractions, normalized, solve_steps
from .criteria.weight_level import WEIGHT_METHODS, weight_prune
from .curvature.factors import KFactors
from .curvature.hooks import is_plain_layer
from .curvature.kfac import factor_sides
from .errors import ConfigError, ModelError
from .measure import count
from .prune_checks import check_normalize
from .structure import ChannelGroups, prune_channels
from .structure.ties import tied_layers
from .surgery.channels import apply_weight_update_

if TYPE_CHECKING:
    from .pruner import RoundInfo


def _curvature_fits(module: nn.Module) -> bool:
    """A plain layer whose patch-mode factors stay within ``MAX_SIDE``.  Why: the K-FAC
    criteria invert dense float64 factors; VGG's 25088-input Linear would need ~15 GB."""
    if not is_plain_layer(module):
        return False
    kind = "linear" if isinstance(module, nn.Linear) else "conv_patch"
    return max(factor_sides(module, kind)[1:]) <= MAX_SIDE


def channel_prune(
    model: nn.Module,
    loader: Iterable | None,
    *,
    method: str,
    example_inputs: Any,
    ratio: float | None = None,
    target_params: float | None = None,
    target_flops: float | None = None,
    per_layer_cap: float = 0.95,
    fisher: str = "true",
    fisher_batches: int | None = None,
    fisher_samples: int = 1,
    damping: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    obs_update: bool = True,
    factors: Mapping[str, KFactors] | None = None,
    ignored_layers: Iterable[str] | None = None,
    tolerance: float = 0.01,
    normalize: bool = False,
) -> tuple[nn.Module, dict]:
    """Prune whole channels of ``model`` (untouched) and return ``(smaller model, info)``.

    Give exactly one of ``ratio`` / ``target_params`` / ``target_flops``.  No group loses
    more than ``per_layer_cap`` of its channels, and every group keeps at least its
    best-scoring channel.  Budgets land within ``tolerance`` (relative) of the target, or
    on the nearest model under it when channels are too coarse (logged); a target below
    what the caps allow is a :class:`ConfigError`.  ``factors`` (from
    ``collect_kfac(..., diag=True)`` for c-obd) skips the curvature pass;
    ``obs_update=False`` skips the OBS compensation; ``normalize`` divides each layer's
    scores by their sum (the original code's option; off in the paper's protocol).

    ``info``: ``threshold``, ``ratio`` (achieved fraction of channels removed),
    ``removed`` (output channels removed per layer), ``keep`` (per group), ``scores``
    (per layer, normalised if asked), ``group_scores``, ``params``/``flops`` (before,
    after), ``skipped_groups`` (not prunable, with the reason), ``unscored_groups``,
    ``ignored_layers``, ``seconds`` (time per stage) and, for a budget, ``target_reached``
    (kept params/FLOPs over the target: 1.0 on target, below 1 under it).  ``threshold``
    is the highest removed score, or for a per-layer ranking the fraction of every group
    removed.
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    mode, target = _check_amount(ratio, target_params, target_flops, per_layer_cap)
    criterion = get_criterion(method)
    groups = ChannelGroups.build(model, example_inputs, ignored_layers)
    if not len(groups):
        raise ModelError(no_groups_message(type(model).__name__, method, groups))
    layers = groups.root_layers()
    if "kfac" in criterion.needs:  # curvature for plain layers it can hold (unscored: kept)
        layers = [n for n in layers if _curvature_fits(model.get_submodule(n))]
    ctx = ScoreContext(
        layers=layers,
        norm_layers=groups.norm_layers(),
        damping=damping,
        seed=seed,
    )
    if "kfac" in criterion.needs and factors is None:
        if loader is None:
            raise ConfigError(f"{method} needs curvature: pass a data loader (or factors=)")
        from .curvature import collect_kfac

        factors = collect_kfac(
            model,
            loader,
            fisher=fisher,
            batches=fisher_batches,
            samples=fisher_samples,
            modules=ctx.layers,
            diag="diag" in criterion.needs,
            seed=seed,
            device=device,
        )
        seconds["curvature"] = time.perf_counter() - start
        start = time.perf_counter()
    ctx.factors = factors or {}
    layer_scores = criterion.score(model, ctx)
    if normalize:
        layer_scores = normalized(layer_scores)
    group_scores = groups.group_scores(layer_scores)
    ranked = layer_fractions(group_scores) if criterion.ranking == "layer" else group_scores
    caps = {
        gid: min(math.floor(per_layer_cap * len(s)), len(s) - 1) for gid, s in group_scores.items()
    }
    ranking = GlobalRanking(ranked, caps)

    def keep_for(k: int) -> dict[str, torch.Tensor]:
        return _keep(groups, ranking.removed(k), ranked)

    before = _count(model, example_inputs)
    reached: dict[str, float] = {}
    if mode == "ratio":
        k = math.floor(target * ranking.total)
    else:
        index = 0 if mode == "params" else 1

        def kept_fraction(k: int) -> float:
            counts = _count(prune_channels(model, groups, keep_for(k)), example_inputs)
            return counts[index] / before[index]

        k, kept = solve_steps(kept_fraction, ranking.total, target, tolerance, mode, per_layer_cap)
        reached["target_reached"] = kept / target
    seconds["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    keep = keep_for(k)
    plan = groups.removal_plan(keep)
    source = model
    if obs_update:
        pruned_rows = {n: idx for (n, dim), idx in plan.items() if dim == "out" and n in ctx.layers}
        updates = criterion.update(model, ctx, pruned_rows)
        if updates:
            source = apply_weight_update_(copy.deepcopy(model), updates)
    pruned = prune_channels(source, groups, keep)
    seconds["surgery"] = time.perf_counter() - start
    after = _count(pruned, example_inputs)
    removed_channels = sum(int(len(s) - len(keep.get(g, s))) for g, s in group_scores.items())
    info = {
        "method": method,
        "threshold": ranking.threshold(k),
        "ratio": removed_channels / max(1, ranking.total),
        "removed_channels": removed_channels,
        "channels": ranking.total,
        "removed": {n: len(idx) for (n, dim), idx in plan.items() if dim == "out"},
        "keep": keep,
        "scores": layer_scores,
        "group_scores": group_scores,
        "params": (before[0], after[0]),
        "flops": (before[1], after[1]),
        "skipped_groups": dict(groups.skipped),
        "unscored_groups": [g.id for g in groups if g.id not in group_scores],
        "ignored_layers": list(groups.ignored),
        "seconds": seconds,
        **reached,
    }
    return pruned, info


def no_groups_message(model_name: str, method: str, groups: ChannelGroups) -> str:
    """Why ``method`` finds nothing to prune: every skipped group with its reason and the
    layers left out (output layer, ``exclude``)."""
    why = "; ".join(f"{g}: {r}" for g, r in groups.skipped.items())
    left_out = ", ".join(repr(n) for n in groups.ignored) or "none"
    return (
        f"{model_name} has no channel group {method} can prune (skipped: {why or 'none'}; "
        f"output and excluded layers: {left_out}); it needs nn.Conv2d/nn.Linear layers "
        "outside those, or use method='eigendamage'"
    )


def prune_round(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str,
    ratio: float | None,
    target: tuple[str, float] | None,
    input_shape: tuple[int, ...],
    per_layer_cap: float,
    fisher: str,
    fisher_batches: int | None,
    fisher_samples: int,
    damping: float,
    exclude: set[str],
    seed: int,
    device: torch.device | str | None,
    normalize: bool = False,
) -> tuple[nn.Module, RoundInfo]:
    """One round of a channel method, or of weight-level obd/obs, for ``pruner.run_pruning``.

    ``target`` is ``("params" | "flops", absolute count)``; ``exclude`` names layers never
    pruned.  Weight-level methods take a ``ratio`` only (they zero weights, the dense
    counts do not change) and put the masks into ``detail["masks"]`` and the parameters
    left non-zero (dense count minus the zeros of the pruned layers) into
    ``detail["params_nonzero"]``.
    """
    from .pruner import RoundInfo

    ref = next(model.parameters(), None)
    if ref is None:
        raise ModelError(f"{type(model).__name__} has no parameters: there is nothing to prune")
    example = torch.zeros(input_shape, device=ref.device, dtype=ref.dtype)
    curvature = dict(
        fisher=fisher,
        fisher_batches=fisher_batches,
        fisher_samples=fisher_samples,
        damping=damping,
        seed=seed,
        device=device,
        per_layer_cap=per_layer_cap,
    )
    if method in WEIGHT_METHODS:
        if target is not None:
            raise ConfigError(f"{method} is weight-level: give a ratio (sparsity), not a budget")
        check_normalize(method, normalize)
        start = time.perf_counter()
        layers = _weight_layers(model, method, exclude)
        zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in layers)
        total = sum(model.get_submodule(n).weight.numel() for n in layers)
        # ratio of the weights still standing, as channel methods take it of the channels left
        sparsity = zeros / total + ratio * (1 - zeros / total)
        pruned, info = weight_prune(model, loader, method, sparsity, modules=layers, **curvature)
        counts = _count(pruned, example)
        detail = {k: info[k] for k in ("sparsity", "threshold", "masks", "per_layer_sparsity")}
        detail["removed_units"] = sum(  # newly zeroed: old zeros stay masked anyway
            int(((model.get_submodule(n).weight != 0).cpu() & ~info["masks"][n]).sum())
            for n in layers
        )
        detail["total_units"] = total - zeros
        zeroed = sum(int((pruned.get_submodule(n).weight == 0).sum()) for n in layers)
        detail["params_nonzero"] = counts[0] - zeroed  # masked now or in an earlier round
        seconds = {"weight_prune": time.perf_counter() - start}
        return pruned, RoundInfo(0, info["sparsity"], counts[0], counts[1], seconds, detail)
    amount: dict[str, float] = {"ratio": ratio}
    if target is not None:
        index = 0 if target[0] == "params" else 1
        amount = {f"target_{target[0]}": target[1] / _count(model, example)[index]}
    pruned, info = channel_prune(
        model,
        loader,
        method=method,
        example_inputs=example,
        ignored_layers=sorted(exclude),
        normalize=normalize,
        **amount,
        **curvature,
    )
    keys = ("threshold", "removed", "removed_channels", "channels", "skipped_groups")
    detail = {k: info[k] for k in (*keys, "target_reached") if k in info}
    detail["removed_units"], detail["total_units"] = info["removed_channels"], info["channels"]
    return pruned, RoundInfo(
        0, info["ratio"], info["params"][1], info["flops"][1], info["seconds"], detail
    )


def _weight_layers(model: nn.Module, method: str, exclude: set[str]) -> list[str]:
    """The layers obd/obs zero weights of; tied layers stay dense (their tie survives)."""
    tied = tied_layers(model)
    plain = [n for n, m in model.named_modules() if is_plain_layer(m)]
    layers = [n for n in plain if n not in exclude and n not in tied]
    if not layers:
        raise ModelError(
            f"no layer {method} can prune in {type(model).__name__}: it prunes nn.Linear and "
            f"nn.Conv2d layers; found {plain or 'none'}, excluded "
            f"{sorted(exclude & set(plain)) or 'none'}, tied {sorted(tied) or 'none'}"
        )
    return layers


def _check_amount(
    ratio: float | None, params: float | None, flops: float | None, cap: float
) -> tuple[str, float]:
    given = {
        k: v for k, v in (("ratio", ratio), ("params", params), ("flops", flops)) if v is not None
    }
    if len(given) != 1:
        raise ConfigError("give exactly one of ratio, target_params, target_flops")
    ((mode, value),) = given.items()
    if mode == "ratio" and not 0 <= value <= 1:
        raise ConfigError(f"ratio (fraction of channels removed) must lie in [0, 1], got {value}")
    if mode != "ratio" and not 0 < value <= 1:
        raise ConfigError(f"target_{mode} (fraction kept) must lie in (0, 1], got {value}")
    if not 0 <= cap <= 1:
        raise ConfigError(f"per_layer_cap must lie in [0, 1], got {cap}")
    return mode, float(value)


def _keep(
    groups: ChannelGroups, removed: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Kept channels per group; a member that would lose ALL its channels (one branch of a
    concat) keeps its best-scoring one, since a layer cannot have zero outputs."""
    keep = {}
    for gid, idx in removed.items():
        mask = torch.ones(groups[gid].size, dtype=torch.bool)
        mask[idx] = False
        for m in groups[gid].members:
            if m.dim == "out" and not mask[m.channel].any():
                mask[m.channel[scores[gid][m.channel].argmax()]] = True
        keep[gid] = mask.nonzero().flatten()
    return keep


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(parameters, FLOPs as MACs) of ``model``, by ``measure.count``'s conventions."""
    counts = count(model, example_inputs=example_inputs)
    return counts.params, counts.flops
