"""The pruning loop: collect curvature -> score -> plan -> cut -> fine-tune, per round.

``prune()`` is the one entry point for every method.  Iterative rounds prune the already
pruned model again (EigenDamage re-estimates K-FAC on the bottleneck cores and merges the
new eigenbases into the old, so bottlenecks never stack).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .criteria.eigendamage import (
    LayerScores,
    apply_plan,
    classifier_name,
    direction_scores,
    plan_pruning,
    rotated_layers,
    target_policy,
)
from .criteria.ranking import solve_ratio
from .curvature import collect_kfac
from .curvature.ekfac import kfe_diagonal
from .curvature.stability import stable_eigendecompose, with_damping_escalation
from .errors import ConfigError, ModelError, unknown_name
from .measure import Counts, count
from .prune_checks import (
    check_arguments,
    check_model,
    check_normalize,
    excluded_roots,
    expand_excluded,
    infer_input_shape,
    match_modes,
    nothing_removed,
    tie_note,
)
from .surgery.eigenbasis import Factored

FineTune = Callable[[nn.Module, int], None]
logger = logging.getLogger("eigendamage")
EIGEN_METHODS = ("eigendamage", "eigendamage-dw")


@dataclass
class RoundInfo:
    """What one round did: the ratio used, counts after it and time per stage."""

    round: int
    ratio: float
    params: int
    flops: int
    seconds: dict[str, float] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)


@dataclass
class PruneResult:
    model: nn.Module
    before: Counts
    after: Counts
    rounds: list[RoundInfo]

    @property
    def params_kept(self) -> float:
        return self.after.params / self.before.params

    @property
    def flops_kept(self) -> float:
        return self.after.flops / self.before.flops


def available_methods() -> list[str]:
    from .criteria import CRITERIA
    from .criteria.weight_level import WEIGHT_METHODS
    from .tp_baselines import TP_METHODS

    return sorted({*EIGEN_METHODS, *CRITERIA, *WEIGHT_METHODS, *TP_METHODS})


def default_damping(method: str) -> float:
    """EigenDamage ranks by eigenvalues (no inverse): no damping. Methods that invert the
    factors (OBS family) need some: 1e-3 of the mean eigenvalue."""
    return 0.0 if method in EIGEN_METHODS else 1e-3


def prune(model: nn.Module, loader: Iterable, **kwargs) -> nn.Module:
    """Prune ``model`` and return the new, smaller module (see :func:`run_pruning`)."""
    return run_pruning(model, loader, **kwargs).model


def run_pruning(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str = "eigendamage",
    ratio: float | None = None,
    target_params: float | None = None,
    target_flops: float | None = None,
    rounds: int = 1,
    input_shape: tuple[int, ...] | None = None,
    per_layer_cap: float = 0.95,
    fisher: str = "true",
    fisher_batches: int | None = None,
    fisher_samples: int = 1,
    damping: float | None = None,
    exclude: Iterable[str] | None = None,
    finetune: FineTune | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
    start_round: int = 1,
    reference: Counts | None = None,
    on_round: Callable[[nn.Module, RoundInfo], None] | None = None,
    before_round: Callable[[int], None] | None = None,
    eigenvalues: str = "kfac",
    normalize: bool = False,
) -> PruneResult:
    """Prune with ``method`` over ``rounds`` rounds; ``model`` itself is not modified.

    Budget: exactly one of ``ratio`` (fraction of units removed *per round*, as in the
    paper: eigen-directions for EigenDamage, channels for channel methods, weights still
    standing for obd/obs), ``target_params`` or ``target_flops`` (fraction of the original
    model *kept* after the last round; intermediate rounds aim at the geometric schedule
    ``target**(r/rounds)``; a round whose target the model already meets is skipped).
    ``exclude`` names modules never pruned (a block excludes all its layers), *in addition*
    to the output layer; unknown names are a :class:`ConfigError`.  Layers sharing a tied
    parameter are never pruned, so ties survive.  ``finetune(model, round)`` trains the
    model in place after each round.  The result has the train/eval modes of ``model``.

    Stopping: a round that removes nothing (every layer at ``per_layer_cap`` or at one unit,
    or the ratio rounds down to no unit) ends the loop -- further rounds would only repeat
    it.  Round 1 removing nothing is a :class:`ConfigError` (the settings prune nothing at
    all); a later one is logged ("round k removed nothing: stopping after k-1 rounds") and
    the result so far is returned, without calling ``finetune`` or ``on_round`` for it.

    Resuming: pass the model saved after round ``start_round - 1`` with ``start_round`` and
    the ``reference`` counts of the original model; ``on_round(model, info)`` is called after
    each finished round (pruned and fine-tuned), ``before_round(round)`` before its curvature
    pass (e.g. to reseed the loader).  Weight-level methods (obd/obs) keep their zeros
    through fine-tuning: the pruned weights' gradients are masked.  ``normalize`` (channel
    criteria only) divides each layer's scores by their sum before the global ranking.
    """
    methods = available_methods()
    if method not in methods:
        raise ConfigError(unknown_name("method", method, methods))
    check_arguments(
        ratio=ratio,
        target_params=target_params,
        target_flops=target_flops,
        rounds=rounds,
        per_layer_cap=per_layer_cap,
        fisher=fisher,
        fisher_batches=fisher_batches,
        fisher_samples=fisher_samples,
        damping=damping,
        eigenvalues=eigenvalues,
        seed=seed,
        start_round=start_round,
    )
    check_model(model)
    check_normalize(method, normalize)
    if damping is None:
        damping = default_damping(method)
    say = log or logger.warning
    roots = excluded_roots(model, exclude, classifier_name(model))
    note = tie_note(model, expand_excluded(model, roots))
    if note:
        say(note)
    input_shape = input_shape or infer_input_shape(loader)
    before = reference or count(model, input_shape)
    current = copy.deepcopy(model)
    infos: list[RoundInfo] = []
    for r in range(start_round, rounds + 1):
        target = None
        if target_params is not None:
            target = ("params", before.params * target_params ** (r / rounds))
        elif target_flops is not None:
            target = ("flops", before.flops * target_flops ** (r / rounds))
        if target is not None and getattr(count(current, input_shape), target[0]) <= target[1]:
            say(f"round {r}/{rounds}: already within its {target[0]} target; skipped")
            continue
        if before_round is not None:
            before_round(r)
        start = time.perf_counter()
        common = dict(
            ratio=ratio,
            target=target,
            input_shape=input_shape,
            per_layer_cap=per_layer_cap,
            fisher=fisher,
            fisher_batches=fisher_batches,
            fisher_samples=fisher_samples,
            damping=damping,
            exclude=expand_excluded(current, roots),
            seed=seed + r - 1,
            device=device,
        )
        if method == "eigendamage-dw":
            from .criteria.eigendamage_dw import eigendamage_dw_round

            pruned, info = eigendamage_dw_round(current, loader, eigenvalues=eigenvalues, **common)
        elif method in EIGEN_METHODS:
            pruned, info = eigendamage_round(current, loader, eigenvalues=eigenvalues, **common)
        elif method.startswith("tp-"):  # Torch-Pruning's criteria through its own pruner
            from .tp_baselines import tp_round

            pruned, info = tp_round(current, loader, method=method, **common)
        else:
            from .channel_pruner import prune_round

            common["normalize"] = normalize  # channel criteria only (check_normalize)
            step = partial(prune_round, current, loader, method=method, **common)
            pruned, info = with_damping_escalation(step, damping)
        if info.detail.get("removed_units", 1) == 0:
            if r == 1:
                budget = f"ratio {ratio:g}" if ratio is not None else "the round's target"
                raise nothing_removed(method, r, info.detail, budget)
            say(f"round {r} removed nothing: stopping after {r - 1} rounds")
            break
        current = pruned
        match_modes(current, model)
        info.round = r
        info.seconds["prune"] = time.perf_counter() - start
        if log:
            log(
                f"round {r}/{rounds}: {method} ratio {info.ratio:.3f} -> "
                f"{info.params:,} params, {info.flops:,} FLOPs"
            )
        if finetune is not None:
            start = time.perf_counter()
            with frozen_zeros(current, info.detail.pop("masks", None)):
                finetune(current, r)
            info.seconds["finetune"] = time.perf_counter() - start
        infos.append(info)
        if on_round is not None:
            on_round(current, info)
    return PruneResult(current, before, count(current, input_shape), infos)


@contextmanager
def frozen_zeros(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Mask gradients of pruned weights so fine-tuning cannot regrow them (SGD's weight decay
    and momentum of a zero weight with zero gradient stay zero)."""
    handles = []
    if masks:
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            keep = mask.to(device=weight.device, dtype=weight.dtype)
            handles.append(weight.register_hook(lambda g, keep=keep: g * keep))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def score_eigendirections(
    model: nn.Module,
    loader: Iterable,
    *,
    fisher: str,
    fisher_batches: int | None,
    fisher_samples: int,
    damping: float,
    exclude: set[str],
    seed: int,
    device: torch.device | str | None,
    eigenvalues: str = "kfac",
) -> tuple[dict[str, Factored], dict[str, LayerScores], dict[str, float]]:
    """K-FAC (channel mode) on the EigenDamage targets, their KFE (optionally with the EKFAC
    diagonal), every target expressed in it, and ``Delta L`` of every eigen-direction.

    Returns ``(rotated layers, scores, seconds per stage)``; shared by every KFE method."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    targets, dense = target_policy(model, exclude)
    if not targets:
        why = "; ".join(f"{n}: {r}" for n, r in dense.items()) or "none"
        left_out = sorted(exclude)
        raise ModelError(
            f"no layer EigenDamage can prune in {type(model).__name__}: it needs nn.Linear or "
            f"nn.Conv2d (groups=1) layers besides the output and excluded ones "
            f"({', '.join(left_out[:8]) + (' ...' if len(left_out) > 8 else '') or 'none'}); "
            f"left dense: {why}"
        )
    curvature = dict(
        fisher=fisher, batches=fisher_batches, samples=fisher_samples, seed=seed, device=device
    )
    factors = collect_kfac(model, loader, conv_mode="channel", modules=targets, **curvature)
    timings["curvature"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kfe = stable_eigendecompose(factors, damping=damping, drop_bias=True)
    timings["eigendecomposition"] = time.perf_counter() - t0
    if eigenvalues == "ekfac":
        t0 = time.perf_counter()
        for name, diag in kfe_diagonal(model, loader, kfe, **curvature).items():
            kfe[name].diag = diag
        timings["ekfac"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rotated = rotated_layers(model, kfe)
    scores = {n: direction_scores(rotated[n], kfe[n]) for n in kfe}
    timings["scoring"] = time.perf_counter() - t0
    return rotated, scores, timings


def eigendamage_round(
    model: nn.Module,
    loader: Iterable,
    *,
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
    eigenvalues: str = "kfac",
) -> tuple[nn.Module, RoundInfo]:
    """One EigenDamage round on a copy of ``model``: K-FAC, KFE, global ranking, surgery.

    ``eigenvalues="ekfac"`` re-estimates the Fisher diagonal in the KFE from per-example
    gradients (a second pass over the data) instead of ``lam_S * lam_A``."""
    rotated, scores, timings = score_eigendirections(
        model,
        loader,
        fisher=fisher,
        fisher_batches=fisher_batches,
        fisher_samples=fisher_samples,
        damping=damping,
        exclude=exclude,
        seed=seed,
        device=device,
        eigenvalues=eigenvalues,
    )
    t0 = time.perf_counter()

    def build_with(r: float) -> tuple[nn.Module, object]:
        plan = plan_pruning(rotated, scores, ratio=r, per_layer_cap=per_layer_cap)
        return apply_plan(copy.deepcopy(model), rotated, plan), plan

    if target is not None:
        ratio = solve_ratio(lambda r: build_with(r)[0], target, input_shape)
    pruned, plan = build_with(ratio)
    timings["surgery"] = time.perf_counter() - t0
    counts = count(pruned, input_shape)
    detail = {
        **({"target_reached": getattr(counts, target[0]) / target[1]} if target else {}),
        "threshold": plan.threshold,
        "pruned_directions": plan.pruned_directions,
        "total_directions": plan.total_directions,
        "removed_units": plan.pruned_directions,
        "total_units": plan.total_directions,
        "predicted_delta_loss": plan.predicted_delta_loss,
        "forms": {n: lp.form for n, lp in plan.layers.items()},
    }
    return pruned, RoundInfo(0, ratio, counts.params, counts.flops, timings, detail)
