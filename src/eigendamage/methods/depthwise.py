"""EigenDamage with depthwise-separable cores (method ``eigendamage-dw``).

After the EigenDamage ranking and cut, each pruned ``k x k`` conv core is replaced by its
rank-``min(d_out, d_in)`` CP decomposition as a pointwise-depthwise-pointwise stack of
ordinary modules (:mod:`eigendamage.surgery.depthwise`), as the original code's
``kfac_eigen_svd_pruner`` did; Linear and 1x1 layers keep the plain EigenDamage forms.

The CP fit is lossy (a generic ``d x d x 9`` tensor has CP rank well above ``d``), so every
round reports the relative reconstruction error per layer; fine-tuning has to recover it.
Later rounds expand the depthwise cores back into (block-diagonal) dense cores -- an exact
rewrite -- so the K-FAC pass, the eigenbasis merge and the ranking work unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..criteria.eigendamage import (
    EigenDamagePlan,
    LayerPlan,
    LayerScores,
    keep_indices,
    plan_pruning,
)
from ..errors import ConfigError
from ..surgery.depthwise import (
    CP_ITERATIONS,
    CPDecomposition,
    cp_als,
    densify,
    depthwise_separable,
)
from ..surgery.eigenbasis import (
    Factored,
    build_form,
    keep_directions,
    layer_path,
    set_submodule,
)
from .base import RoundInfo, RoundSpec
from .budget import solve_ratio
from .eigendamage import EigenDamage, EigenDetail, score_eigendirections

TOLERANCE = 0.01  # relative, for params/FLOPs budgets


def _spatial(f: Factored) -> bool:
    return isinstance(f.template, nn.Conv2d) and f.core.shape[-1] > 1


def dw_keeps(
    f: Factored, scores: LayerScores, lp: LayerPlan, threshold: float, per_layer_cap: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The directions a k x k conv keeps in depthwise form, or ``None`` for the plain form.

    Every k x k conv goes depthwise as in the original code (its "all_keep=False"), also
    those EigenDamage's own size rule would leave dense: their directions are cut at the
    same global threshold.  Exception (ours): a conv with fewer than ``k*k`` input or output
    channels (an RGB or grayscale stem) keeps the plain form, because rank
    ``min(d_out, d_in)`` would squeeze it into fewer spatial filters than its kernel has
    taps.  The rule depends on the layer, not the ratio, so counts stay monotone in the
    ratio and budgets can be solved by bisection.
    """
    if not _spatial(f) or min(f.c_in, f.c_out) < f.core.shape[-1]:
        return None
    if lp.form != "dense":
        return lp.keep_in, lp.keep_out
    return (
        keep_indices(scores.inputs, scores.inputs <= threshold, per_layer_cap),
        keep_indices(scores.outputs, scores.outputs <= threshold, per_layer_cap),
    )


def apply_dw_plan(
    model: nn.Module,
    rotated: dict[str, Factored],
    scores: dict[str, LayerScores],
    plan: EigenDamagePlan,
    *,
    per_layer_cap: float,
    iterations: int | None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` with every planned layer rebuilt: k x k convs depthwise-separable
    (see :func:`dw_keeps`), the rest in their EigenDamage form or left as they are.

    ``iterations=None`` builds zero-weight modules of the right shapes only (for budget
    search, where only the counts matter).  Returns the model and the CP error per layer.
    """
    new = copy.deepcopy(model)
    errors: dict[str, float] = {}
    for name, lp in plan.layers.items():
        f = rotated[name]
        keeps = dw_keeps(f, scores[name], lp, plan.threshold, per_layer_cap)
        if keeps is None:
            if lp.form == "dense":
                continue
            module = build_form(keep_directions(f, lp.keep_in, lp.keep_out), lp.form)
        else:
            kept = keep_directions(f, *keeps)
            d_out, d_in, k = kept.core.shape
            rank = min(d_out, d_in)
            if iterations is None:
                shapes = ((d_out, rank), (d_in, rank), (k, rank))
                cp = CPDecomposition(*(torch.zeros(s, dtype=torch.float64) for s in shapes))
            else:
                cp = cp_als(kept.core, rank, iterations=iterations, seed=seed)
                errors[name] = cp.error
            module = depthwise_separable(kept, cp)
        set_submodule(new, layer_path(name, new), module)
    return new, errors


class DepthwiseEigenDamage(EigenDamage):
    """One round: K-FAC on the (densified) model, KFE ranking as in EigenDamage
    (``eigenvalues`` as there), then the pruned k x k cores as depthwise-separable stacks.
    Budgets are met on the final, depthwise form."""

    name = "eigendamage-dw"
    description = "EigenDamage with the pruned k x k cores as depthwise-separable stacks"
    cp_iterations = CP_ITERATIONS

    def round(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """The depthwise round (see :class:`DepthwiseEigenDamage`)."""
        rotated, scores, timings = score_eigendirections(densify(model), loader, spec)
        ratio = spec.ratio
        with spec.stage("surgery", timings, "(depthwise cores)"):
            if spec.target is not None:
                ratio = self._solve(model, rotated, scores, spec)
            cap = spec.per_layer_cap
            plan = plan_pruning(rotated, scores, ratio=ratio, per_layer_cap=cap)
            pruned, cp_errors = apply_dw_plan(
                model, rotated, scores, plan, per_layer_cap=cap, iterations=self.cp_iterations,
                seed=spec.seed,
            )  # fmt: skip
        counts = spec.count(pruned)
        forms = {n: "depthwise" if n in cp_errors else lp.form for n, lp in plan.layers.items()}
        detail = EigenDetail.of(plan, cp_error=cp_errors, forms=forms)
        return pruned, RoundInfo(0, ratio, counts.params, counts.flops, timings, detail)

    def _solve(
        self,
        model: nn.Module,
        rotated: dict[str, Factored],
        scores: dict[str, LayerScores],
        spec: RoundSpec,
    ) -> float:
        """The ratio whose depthwise form meets ``spec.target``; the depthwise form alone
        (ratio 0) must not already be under it."""
        metric, goal = spec.target

        def shapes_at(r: float) -> nn.Module:
            plan = plan_pruning(rotated, scores, ratio=r, per_layer_cap=spec.per_layer_cap)
            return apply_dw_plan(
                model, rotated, scores, plan, per_layer_cap=spec.per_layer_cap, iterations=None
            )[0]

        ceiling = getattr(spec.count(shapes_at(0.0)), metric)
        if ceiling < goal * (1 - TOLERANCE):
            raise ConfigError(
                f"target {metric} {goal:,.0f} is unreachable for eigendamage-dw: the depthwise "
                f"form alone, without pruning, leaves {ceiling:,.0f}; use a smaller target, "
                "a ratio, or eigendamage"
            )
        return solve_ratio(
            shapes_at, spec.target, spec.input_shape, example_inputs=spec.example_inputs,
            tolerance=TOLERANCE,
        )  # fmt: skip
