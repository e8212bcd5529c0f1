"""One-shot channel pruning with the baseline criteria (C-OBD, C-OBS, Kron-OBD/OBS, ...).

``model -> coupled channel groups -> curvature the criterion needs -> per-channel scores ->
one global threshold (capped per group) -> OBS update (if any) -> physical removal``.

The amount to prune is either ``ratio`` (the fraction of prunable channels removed, as the
paper's "pruning ratio") or a budget ``target_params`` / ``target_flops`` (the fraction of
the model's parameters / FLOPs KEPT), for which the global threshold is found by bisection
over the sorted scores (:mod:`.budget`).  Criteria with ``ranking = "layer"`` (``l1``)
remove the same fraction of every group instead (see :mod:`eigendamage.criteria.ranking`);
``normalize`` divides each layer's scores by their sum before ranking, as the original
code's option did.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..criteria import ScoreContext, get_criterion
from ..criteria.amounts import check_fraction, one_budget
from ..criteria.base import GlobalRanking, collect_factors
from ..criteria.eigendamage import MAX_SIDE, classifier_name
from ..criteria.ranking import layer_fractions, normalized
from ..curvature.factors import KFactors
from ..curvature.hooks import DataPass
from ..curvature.kfac import factor_sides
from ..curvature.types import FisherType
from ..errors import ModelError
from ..layers import is_plain_layer
from ..measure import count
from ..structure import ChannelGroups, prune_channels
from ..surgery.channels import apply_weight_update_
from .base import DampedMethod, Record, RoundDetail, RoundInfo, RoundSpec, batches_read, stage
from .budget import Scale, solve_budget
from .checks import example_input

CHANNEL_NOTES = {
    "c-obd": "channels: OBD with the exact diagonal Fisher",
    "c-obs": "channels: OBS per weight under the K-FAC inverse, with update",
    "kron-obd": "channels: 1/2 S_ii w_i'A w_i (the paper's Kron-OBD)",
    "kron-obd-orig": "channels: Kron-OBD as the original code scored it",
    "kron-obs": "channels: row-constrained OBS under A (x) S, joint update",
    "kron-obs-orig": "channels: Kron-OBS as the original code scored and updated it",
    "l1": "channels: filter L1 norm, same fraction of every layer (Li et al.)",
    "random": "channels: seeded random scores",
    "slimming": "channels: |BatchNorm gamma| (network slimming)",
}


@dataclass(kw_only=True)
class ChannelPruneInfo(Record):
    """What :func:`channel_prune` did (see there)."""

    method: str
    threshold: float
    ratio: float
    removed_channels: int
    channels: int
    removed: dict[str, int]
    keep: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    group_scores: dict[str, torch.Tensor]
    params: tuple[int, int]
    flops: tuple[int, int]
    skipped_groups: dict[str, str]
    unscored_groups: list[str]
    ignored_layers: list[str]
    seconds: dict[str, float]
    target_reached: float | None = None


@dataclass(kw_only=True)
class ChannelDetail(RoundDetail):
    """One round of a channel criterion: its threshold and the channels removed."""

    threshold: float
    removed: dict[str, int]
    removed_channels: int
    channels: int
    skipped_groups: dict[str, str]
    target_reached: float | None = None
    removed_units: int
    total_units: int


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
    fisher: FisherType = "true",
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
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, ChannelPruneInfo]:
    """Prune whole channels of ``model`` (untouched) and return ``(smaller model, info)``.

    Give exactly one of ``ratio`` / ``target_params`` / ``target_flops``.  No group loses
    more than ``per_layer_cap`` of its channels, and every group keeps at least its
    best-scoring channel.  Budgets land within ``tolerance`` (relative) of the target, or
    on the nearest model under it when channels are too coarse (logged); a target below
    what the caps allow is a :class:`ConfigError`.  ``factors`` (from
    ``collect_kfac(..., diag=True)`` for c-obd) skips the curvature pass;
    ``obs_update=False`` skips the OBS compensation; ``normalize`` divides each layer's
    scores by their sum (the original code's option; off in the paper's protocol).
    ``log`` (None: quiet) takes a line as each stage starts and ends.

    ``info`` (:class:`ChannelPruneInfo`): ``threshold``, ``ratio`` (achieved fraction of
    channels removed), ``removed`` (output channels removed per layer), ``keep`` (per
    group), ``scores`` (per layer, normalised if asked), ``group_scores``,
    ``params``/``flops`` (before, after), ``skipped_groups`` (not prunable, with the
    reason), ``unscored_groups``, ``ignored_layers``, ``seconds`` (time per stage) and, for
    a budget, ``target_reached`` (kept params/FLOPs over the target: 1.0 on target, below
    1 under it).  ``threshold`` is the highest removed score, or for a per-layer ranking
    the fraction of every group removed.
    """
    seconds: dict[str, float] = {}
    mode, target = one_budget(ratio, target_params, target_flops, ratio_open=(False, False))
    check_fraction("per_layer_cap", per_layer_cap, open_low=False, open_high=False)
    criterion = get_criterion(method)
    groups = ChannelGroups.build(model, example_inputs, ignored_layers)
    if not len(groups):
        raise ModelError(no_groups_message(type(model).__name__, method, groups))
    layers = groups.root_layers()
    if "kfac" in criterion.needs:  # curvature for plain layers it can hold (unscored: kept)
        layers = [n for n in layers if _curvature_fits(model.get_submodule(n))]
    ctx = ScoreContext(layers=layers, norm_layers=groups.norm_layers(), damping=damping, seed=seed)
    if "kfac" in criterion.needs and factors is None:
        data = DataPass(fisher, fisher_batches, fisher_samples, seed, device)
        diag = "diag" in criterion.needs
        with stage(log, "curvature", seconds, batches_read(loader, fisher_batches)):
            factors = collect_factors(model, loader, data, ctx.layers, needed_by=method, diag=diag)
    ctx.factors = factors or {}
    before = count(model, example_inputs=example_inputs)
    with stage(log, "scoring", seconds, f"of {len(groups)} channel groups"):
        layer_scores = criterion.score(model, ctx)
        if normalize:
            layer_scores = normalized(layer_scores)
        group_scores = groups.group_scores(layer_scores)
        ranked = layer_fractions(group_scores) if criterion.ranking == "layer" else group_scores
        caps = {
            gid: min(math.floor(per_layer_cap * len(s)), len(s) - 1)
            for gid, s in group_scores.items()
        }
        ranking = GlobalRanking(ranked, caps)

        def keep_for(k: int) -> dict[str, torch.Tensor]:
            return _keep(groups, ranking.removed(k), ranked)

        target_reached = None
        if mode == "ratio":
            k = math.floor(target * ranking.total)
        else:

            def kept_fraction(k: float) -> tuple[float, None]:
                pruned = prune_channels(model, groups, keep_for(int(k)))
                after = count(pruned, example_inputs=example_inputs)
                return getattr(after, mode) / getattr(before, mode), None

            solved = solve_budget(
                kept_fraction,
                target,
                Scale(ranking.total, steps_of_one=True, accept_hi="above"),
                label=f"target_{mode}={target:g}",
                unreachable=lambda kept: (
                    f"target_{mode}={target:g} is unreachable with "
                    f"per_layer_cap={per_layer_cap:g}: at most {1 - kept:.4f} of the {mode} "
                    f"can be removed (kept fraction {kept:.4f}); raise per_layer_cap or the "
                    "target"
                ),
                value_format=".4f",
                tolerance=tolerance,
            )
            k, target_reached = int(solved.point), solved.value / target
    with stage(log, "surgery", seconds):
        keep = keep_for(k)
        plan = groups.removal_plan(keep)
        source = model
        if obs_update:
            pruned_rows = {
                n: idx for (n, dim), idx in plan.items() if dim == "out" and n in ctx.layers
            }
            updates = criterion.update(model, ctx, pruned_rows)
            if updates:
                source = apply_weight_update_(copy.deepcopy(model), updates)
        pruned = prune_channels(source, groups, keep)
    after = count(pruned, example_inputs=example_inputs)
    removed_channels = sum(int(len(s) - len(keep.get(g, s))) for g, s in group_scores.items())
    return pruned, ChannelPruneInfo(
        method=method,
        threshold=ranking.threshold(k),
        ratio=removed_channels / max(1, ranking.total),
        removed_channels=removed_channels,
        channels=ranking.total,
        removed={n: len(idx) for (n, dim), idx in plan.items() if dim == "out"},
        keep=keep,
        scores=layer_scores,
        group_scores=group_scores,
        params=(before.params, after.params),
        flops=(before.flops, after.flops),
        skipped_groups=dict(groups.skipped),
        unscored_groups=[g.id for g in groups if g.id not in group_scores],
        ignored_layers=list(groups.ignored),
        seconds=seconds,
        target_reached=target_reached,
    )


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


class ChannelMethod(DampedMethod):
    """A channel criterion of :data:`eigendamage.criteria.CRITERIA` as a method: whole
    channels of coupled groups removed, ``ratio`` a fraction of the prunable channels."""

    units = "channels"
    takes_normalize = True

    def __init__(self, criterion: str) -> None:
        self.name = criterion
        doc = (type(get_criterion(criterion)).__doc__ or "").strip().splitlines()
        self.description = CHANNEL_NOTES.get(criterion) or f"channels: {doc[0] if doc else ''}"

    def check(
        self, model: nn.Module, input_shape: tuple[int, ...] | None, example_inputs: Any = None
    ) -> None:
        """Some channel group besides the output layer's can be pruned (traced on
        ``example_inputs`` when given, else on zeros of ``input_shape``)."""
        output = classifier_name(model)
        example = example_input(model, input_shape, example_inputs)
        groups = ChannelGroups.build(model, example, [output] if output else [])
        if not len(groups):
            why = "; ".join(f"{g}: {r}" for g, r in groups.skipped.items())
            raise ModelError(
                f"no channel group {self.name} can prune "
                f"({why or f'no Conv2d/Linear layer besides the output layer {output!r}'})"
            )

    def round_at(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """One :func:`channel_prune` at the round's budget, as a fraction of this model."""
        example = spec.example(model)
        target = spec.target
        target_params = target_flops = None
        if target is not None:  # the round's absolute target as a fraction of this model
            kept = target.count / getattr(count(model, example_inputs=example), target.metric)
            target_params, target_flops = (
                (kept, None) if target.metric == "params" else (None, kept)
            )
        pruned, info = channel_prune(
            model, loader, method=self.name, example_inputs=example,
            ratio=spec.ratio, target_params=target_params, target_flops=target_flops,
            per_layer_cap=spec.per_layer_cap, damping=spec.damping,
            fisher=spec.fisher, fisher_batches=spec.fisher_batches,
            fisher_samples=spec.fisher_samples, seed=spec.seed, device=spec.device,
            ignored_layers=sorted(spec.exclude), normalize=spec.normalize, log=spec.log,
        )  # fmt: skip
        detail = ChannelDetail(
            threshold=info.threshold, removed=info.removed,
            removed_channels=info.removed_channels, channels=info.channels,
            skipped_groups=info.skipped_groups, target_reached=info.target_reached,
            removed_units=info.removed_channels, total_units=info.channels,
        )  # fmt: skip
        params, flops = info.params[1], info.flops[1]
        return pruned, RoundInfo(0, info.ratio, params, flops, info.seconds, detail)
