"""EigenDamage as a :class:`~.base.Method`: K-FAC, KFE, one global ranking of eigen-directions,
surgery into the cheapest exact form (the scoring and planning live in
:mod:`eigendamage.criteria.eigendamage`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..criteria.base import collect_factors
from ..criteria.eigendamage import (
    EigenDamagePlan,
    LayerScores,
    apply_plan,
    classifier_name,
    direction_scores,
    eigendamage_targets,
    plan_pruning,
    rotated_layers,
    target_policy,
)
from ..curvature.ekfac import kfe_diagonal
from ..curvature.stability import stable_eigendecompose
from ..errors import ModelError
from ..surgery.eigenbasis import Factored, Form
from .base import Method, RoundDetail, RoundInfo, RoundSpec
from .budget import solve_ratio
from .checks import no_plain_layer

Scored = tuple[dict[str, Factored], dict[str, LayerScores], dict[str, float]]


@dataclass(kw_only=True)
class EigenDetail(RoundDetail):
    """One round of EigenDamage (or its depthwise form): the threshold and directions."""

    target_reached: float | None = None  # kept params/FLOPs over the target, for a budget
    threshold: float
    pruned_directions: int
    total_directions: int
    removed_units: int
    total_units: int
    predicted_delta_loss: float | None = None  # sum of Delta L of every core weight removed
    cp_error: dict[str, float] | None = None  # depthwise form: CP error per layer
    forms: dict[str, Form | str]

    @classmethod
    def of(
        cls,
        plan: EigenDamagePlan,
        *,
        forms: dict[str, Form | str],
        target_reached: float | None = None,
        predicted_delta_loss: float | None = None,
        cp_error: dict[str, float] | None = None,
    ) -> EigenDetail:
        """The detail of ``plan`` (directions are the units)."""
        return cls(
            target_reached=target_reached, threshold=plan.threshold,
            pruned_directions=plan.pruned_directions, total_directions=plan.total_directions,
            removed_units=plan.pruned_directions, total_units=plan.total_directions,
            predicted_delta_loss=predicted_delta_loss, cp_error=cp_error, forms=forms,
        )  # fmt: skip


def score_eigendirections(model: nn.Module, loader: Iterable, spec: RoundSpec) -> Scored:
    """K-FAC (channel mode) on the EigenDamage targets, their KFE (optionally with the EKFAC
    diagonal), every target expressed in it, and ``Delta L`` of every eigen-direction.

    Returns ``(rotated layers, scores, seconds per stage)``; shared by every KFE method."""
    timings: dict[str, float] = {}
    targets, dense = target_policy(model, spec.exclude)
    if not targets:
        why = "; ".join(f"{n}: {r}" for n, r in dense.items()) or "none"
        left_out = sorted(spec.exclude)
        raise ModelError(
            f"no layer EigenDamage can prune in {type(model).__name__}: it needs nn.Linear or "
            f"nn.Conv2d (groups=1) layers besides the output and excluded ones "
            f"({', '.join(left_out[:8]) + (' ...' if len(left_out) > 8 else '') or 'none'}); "
            f"left dense: {why}"
        )
    data = spec.data_pass()
    with spec.stage("curvature", timings, spec.batches(loader)):
        factors = collect_factors(
            model, loader, data, targets, needed_by="EigenDamage", conv_mode="channel"
        )
    with spec.stage("eigendecomposition", timings, f"of {len(factors)} layers"):
        kfe = stable_eigendecompose(factors, damping=spec.damping, drop_bias=True)
    if spec.eigenvalues == "ekfac":
        with spec.stage("ekfac", timings, f"diagonal {spec.batches(loader)}"):
            diagonals = kfe_diagonal(
                model, loader, kfe, fisher=data.fisher, batches=data.batches,
                samples=data.samples, seed=data.seed, device=data.device,
            )  # fmt: skip
        for name, diag in diagonals.items():
            kfe[name].diag = diag
    with spec.stage("scoring", timings):
        rotated = rotated_layers(model, kfe)
        scores = {n: direction_scores(rotated[n], kfe[n]) for n in kfe}
    return rotated, scores, timings


class EigenDamage(Method):
    """Prune eigen-directions of the Kronecker-factored eigenbasis (the paper's method).

    ``eigenvalues="ekfac"`` re-estimates the Fisher diagonal in the KFE from per-example
    gradients (a second pass over the data) instead of ``lam_S * lam_A``.  It ranks by
    eigenvalues and inverts nothing, so it needs no damping.
    """

    name = "eigendamage"
    description = "EigenDamage: eigen-directions of the K-FAC eigenbasis (the paper)"
    units = "directions"
    default_damping = 0.0

    def check(
        self, model: nn.Module, input_shape: tuple[int, ...] | None, example_inputs: Any = None
    ) -> None:
        """Some Linear/Conv2d layer besides the output layer is a target."""
        output = classifier_name(model)
        if not eigendamage_targets(model, {output} if output else set()):
            raise no_plain_layer(model, self.name, output)

    def round(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """K-FAC, KFE, global ranking, surgery (see :class:`EigenDamage`)."""
        rotated, scores, timings = score_eigendirections(model, loader, spec)

        def build_with(r: float) -> tuple[nn.Module, EigenDamagePlan]:
            plan = plan_pruning(rotated, scores, ratio=r, per_layer_cap=spec.per_layer_cap)
            return apply_plan(copy.deepcopy(model), rotated, plan), plan

        ratio = spec.ratio
        with spec.stage("surgery", timings):
            if spec.target is not None:
                ratio = solve_ratio(
                    lambda r: build_with(r)[0], spec.target, spec.input_shape,
                    example_inputs=spec.example_inputs,
                )  # fmt: skip
            pruned, plan = build_with(ratio)
        counts = spec.count(pruned)
        target = spec.target
        detail = EigenDetail.of(
            plan,
            target_reached=getattr(counts, target.metric) / target.count if target else None,
            predicted_delta_loss=plan.predicted_delta_loss,
            forms={n: lp.form for n, lp in plan.layers.items()},
        )
        return pruned, RoundInfo(0, ratio, counts.params, counts.flops, timings, detail)
