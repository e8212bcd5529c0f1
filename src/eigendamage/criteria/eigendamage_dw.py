"""EigenDamage with depthwise-separable cores (method ``eigendamage-dw``).

After the EigenDamage ranking and cut, each pruned ``k x k`` conv core ``W'`` of shape
``(d_out, d_in, K)`` (``K = k*k``) is approximated by a rank-``R`` CP decomposition
``W'[o, i, k] ~ sum_r U[o, r] V[i, r] S[k, r]`` with ``R = min(d_out, d_in)``, as the
original code's ``kfac_eigen_svd_pruner`` did.  ``V^T`` folds into ``rot_in`` (``c_in -> R``),
``U`` into ``rot_out`` (``R -> c_out``) and the core becomes a depthwise ``k x k`` conv with
``R`` groups whose filter ``r`` is ``S[:, r]``: a pointwise-depthwise-pointwise stack of
ordinary modules.  Linear and 1x1 layers keep the plain EigenDamage forms.

The CP fit is lossy (a generic ``d x d x 9`` tensor has CP rank well above ``d``), so every
round reports the relative reconstruction error per layer; fine-tuning has to recover it.
Later rounds expand the depthwise cores back into (block-diagonal) dense cores -- an exact
rewrite -- so the K-FAC pass, the eigenbasis merge and the ranking work unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..measure import count
from ..pruner import RoundInfo
from ..surgery.eigenbasis import (
    Factored,
    KFEBottleneck,
    _load,
    _pointwise,
    build,
    layer_path,
    select,
    set_submodule,
)
from .eigendamage import (
    EigenDamagePlan,
    LayerPlan,
    LayerScores,
    _keep_indices,
    plan_pruning,
)
from .ranking import solve_ratio

CP_ITERATIONS = 50  # on trained digits-vgg cores, 100 sweeps lower the error by < 0.006
TOLERANCE = 0.01  # relative, for params/FLOPs budgets


@dataclass
class CPDecomposition:
    """``tensor[o, i, k] ~ sum_r out[o, r] * inp[i, r] * spatial[k, r]``.

    ``out`` and ``inp`` have unit-norm columns; ``spatial`` carries the scale.  ``errors``
    holds the relative Frobenius error after each ALS sweep.
    """

    out: torch.Tensor
    inp: torch.Tensor
    spatial: torch.Tensor
    errors: list[float] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.out.shape[1]

    @property
    def error(self) -> float:
        return self.errors[-1] if self.errors else float("nan")

    def full(self) -> torch.Tensor:
        """The reconstructed ``(d_out, d_in, K)`` tensor."""
        return torch.einsum("or,ir,kr->oik", self.out, self.inp, self.spatial)


def _khatri_rao(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product, rows ordered ``(row of a, row of b)`` like ``reshape``."""
    return (a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1])


def _solve_gram(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram^-1``; the pseudo-inverse only when the Gram matrix is singular."""
    solution, info = torch.linalg.solve_ex(gram, rhs.T)
    if int(info) != 0 or not torch.isfinite(solution).all():
        return rhs @ torch.linalg.pinv(gram, hermitian=True)
    return solution.T


def cp_als(
    tensor: torch.Tensor, rank: int, *, iterations: int = CP_ITERATIONS, seed: int = 0
) -> CPDecomposition:
    """Rank-``rank`` CP decomposition of a 3-way tensor by alternating least squares.

    Each sweep solves exactly for one factor with the other two fixed, so the error never
    increases; the init is seeded Gaussian, the number of sweeps fixed (reproducible cost).
    Computed in float64.
    """
    if tensor.dim() != 3 or rank < 1:
        raise ModelError(f"cp_als needs a 3-way tensor and rank >= 1, got {tuple(tensor.shape)}")
    t = tensor.detach().double().cpu()
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in t.shape]
    # mode-n unfoldings whose column order matches _khatri_rao of the two other factors
    unfolded = [t.reshape(t.shape[0], -1), t.transpose(0, 1).reshape(t.shape[1], -1)]
    unfolded.append(t.permute(2, 0, 1).reshape(t.shape[2], -1))
    norm_sq = float(t.square().sum())
    errors = []
    for _ in range(iterations):
        for mode in range(3):
            a, b = (factors[m] for m in range(3) if m != mode)
            gram = (a.T @ a) * (b.T @ b)
            rhs = unfolded[mode] @ _khatri_rao(a, b)
            updated = _solve_gram(gram, rhs)
            if mode < 2:  # keep the scale in the spatial factor
                updated = updated / updated.norm(dim=0).clamp_min(1e-300)
            factors[mode] = updated
        # ||T - X||^2 = ||T||^2 - 2 <T, X> + ||X||^2, from the last mode's products
        spatial = factors[2]
        residual = norm_sq - 2 * float((spatial * rhs).sum())
        residual += float((gram * (spatial.T @ spatial)).sum())
        errors.append(math.sqrt(max(residual, 0.0) / norm_sq) if norm_sq > 0 else 0.0)
    return CPDecomposition(*factors, errors=errors)


def depthwise_separable(f: Factored, cp: CPDecomposition) -> KFEBottleneck:
    """Build ``f`` (a conv layer in factored form) with its core replaced by ``cp``:
    1x1 conv ``c_in -> R``, depthwise ``k x k`` conv with ``R`` groups, 1x1 conv ``R -> c_out``.
    """
    template = f.template
    if not isinstance(template, nn.Conv2d):
        raise ModelError("depthwise-separable cores need a Conv2d layer")
    like = template.weight
    rank = cp.rank
    p_in = cp.inp.T if f.p_in is None else cp.inp.T @ f.p_in
    p_out = cp.out if f.p_out is None else f.p_out @ cp.out
    depthwise = nn.Conv2d(
        rank,
        rank,
        template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=rank,
        bias=False,
        padding_mode=template.padding_mode,
    )
    weight = cp.spatial.T.reshape(rank, 1, *template.kernel_size)
    return KFEBottleneck(
        _pointwise(template, p_in, None, like),
        _load(depthwise, weight, None, like),
        _pointwise(template, p_out, f.bias, like),
    )


def is_depthwise_core(module: nn.Module) -> bool:
    """A bottleneck built by :func:`depthwise_separable`."""
    if not isinstance(module, KFEBottleneck) or not isinstance(module.core, nn.Conv2d):
        return False
    core = module.core
    return core.groups > 1 and core.groups == core.in_channels == core.out_channels


def densify(model: nn.Module) -> nn.Module:
    """A copy with every depthwise core expanded into the equal block-diagonal dense conv,
    so that K-FAC, the eigenbasis merge and the ranking see ordinary layers."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if not is_depthwise_core(module):
            continue
        core = module.core
        weight = torch.zeros(
            core.out_channels, core.in_channels, *core.kernel_size, dtype=core.weight.dtype
        )
        idx = torch.arange(core.out_channels)
        weight[idx, idx] = core.weight.detach()[:, 0].to(weight.device)
        full = nn.Conv2d(
            core.in_channels,
            core.out_channels,
            core.kernel_size,
            stride=core.stride,
            padding=core.padding,
            dilation=core.dilation,
            bias=core.bias is not None,
            padding_mode=core.padding_mode,
        )
        set_submodule(dense, f"{name}.core", _load(full, weight, core.bias, core.weight))
    return dense


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
        _keep_indices(scores.inputs, scores.inputs <= threshold, per_layer_cap),
        _keep_indices(scores.outputs, scores.outputs <= threshold, per_layer_cap),
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
            module = build(select(f, lp.keep_in, lp.keep_out), lp.form)
        else:
            kept = select(f, *keeps)
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


def eigendamage_dw_round(
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
    cp_iterations: int = CP_ITERATIONS,
) -> tuple[nn.Module, RoundInfo]:
    """One round: K-FAC on the (densified) model, KFE ranking as in EigenDamage (``eigenvalues``
    as there), then the pruned k x k cores as depthwise-separable stacks.  Budgets are met on
    the final, depthwise form."""
    from ..pruner import score_eigendirections

    dense = densify(model)
    rotated, scores, timings = score_eigendirections(
        dense,
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

    def plan_at(r: float) -> EigenDamagePlan:
        return plan_pruning(rotated, scores, ratio=r, per_layer_cap=per_layer_cap)

    if target is not None:

        def shapes_at(r: float) -> nn.Module:
            plan = plan_at(r)
            return apply_dw_plan(
                model, rotated, scores, plan, per_layer_cap=per_layer_cap, iterations=None
            )[0]

        metric, goal = target
        ceiling = getattr(count(shapes_at(0.0), input_shape), metric)
        if ceiling < goal * (1 - TOLERANCE):
            raise ConfigError(
                f"target {metric} {goal:,.0f} is unreachable for eigendamage-dw: the depthwise "
                f"form alone, without pruning, leaves {ceiling:,.0f}; use a smaller target, "
                "a ratio, or eigendamage"
            )
        ratio = solve_ratio(shapes_at, target, input_shape, tolerance=TOLERANCE)
    plan = plan_at(ratio)
    pruned, cp_errors = apply_dw_plan(
        model,
        rotated,
        scores,
        plan,
        per_layer_cap=per_layer_cap,
        iterations=cp_iterations,
        seed=seed,
    )
    timings["surgery"] = time.perf_counter() - t0
    counts = count(pruned, input_shape)
    detail = {
        "threshold": plan.threshold,
        "pruned_directions": plan.pruned_directions,
        "total_directions": plan.total_directions,
        "removed_units": plan.pruned_directions,
        "total_units": plan.total_directions,
        "cp_error": cp_errors,
        "forms": {n: "depthwise" if n in cp_errors else lp.form for n, lp in plan.layers.items()},
    }
    return pruned, RoundInfo(0, ratio, counts.params, counts.flops, timings, detail)
