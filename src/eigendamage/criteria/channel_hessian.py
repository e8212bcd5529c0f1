"""Hessian-based channel criteria: C-OBD, C-OBS, Kron-OBD, Kron-OBS (EigenDamage's baselines).

Notation per layer: ``W`` is ``weight.flatten(1)`` with the bias as a trailing column when
the factors have one, ``w_i`` its row (output channel ``i``), and the Fisher/Hessian of the
layer is ``F ~= A (x) S`` so that the quadratic loss increase of a change ``D`` of ``W`` is
``q(D) = 1/2 tr(D^T S D A)``.  Removing channel ``i`` sets ``w_i`` to 0:

* C-OBD: diagonal Fisher ``F_ij`` (exact, per example):  ``1/2 sum_j W_ij^2 F_ij``.
* C-OBS: every weight of the row is an independent OBS problem under ``H^-1 ~= A^-1 (x)
  S^-1``: ``1/2 sum_j W_ij^2 / ([S^-1]_ii [A^-1]_jj)``; update ``-S^-1 C A^-1`` with
  ``C_ij = W_ij / ([S^-1]_ii [A^-1]_jj)`` on the removed rows, 0 elsewhere (the sum of the
  single-weight OBS updates, as in the original code; not the joint optimum).
* Kron-OBD: ``1/2 S_ii w_i^T A w_i`` = ``q`` of zeroing row ``i`` alone (the paper).  The
  original code used ``S_ii sum_j ((W o W) A)_ij``, i.e. ``w_i^2`` (elementwise) in place of
  ``w_i`` in the quadratic form, which is not ``q`` of anything; offered as
  ``kron-obd-orig`` for reproduction only.
* Kron-OBS: ``1/2 w_i^T A w_i / [S^-1]_ii``: ``q`` after the best update of the other rows
  (row-constrained OBS); for a removed row set ``P`` the joint optimum is
  ``D = -S^-1[:, P] ([S^-1]_PP)^-1 W_P`` (independent of ``A``).  A deliberate departure
  from the original code, which scored ``sum_j ((W o W) A)_ij / [S^-1]_ii`` (the same
  elementwise form as its Kron-OBD, again not ``q`` of anything) and summed the
  single-row updates ``-S^-1[:, p] w_p / [S^-1]_pp``; both are ``kron-obs-orig``, with the
  original's undamped ``A`` (``S^-1`` is damped as everywhere here).

Inverses are of the damped factors ``M + gamma I``, ``gamma = damping * mean(diag M)`` per
factor (per group for grouped convs, like ``curvature.eigen.damped``), by Cholesky in
float64; the OBS scores use the same damped ``A``, so score and update describe one
quadratic.
Grouped (depthwise) layers are handled block by block: ``W`` is viewed as
``(groups, out/groups, d)`` against factors with a leading group dimension.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..curvature.factors import KFactors
from ..errors import CurvatureError, ModelError
from .base import ChannelCriterion, ScoreContext, register, require_factors

# (W, its factors, removed-row mask, layer name) -> the OBS update Delta W of that layer
Step = Callable[[torch.Tensor, KFactors, torch.Tensor, str], torch.Tensor]


def layer_matrix(module: nn.Module, f: KFactors) -> torch.Tensor:
    """``W`` (+ bias column when ``f.has_bias``) as ``(groups, out/groups, d)`` float64."""
    w = module.weight.detach().flatten(1).to(f.A.device, torch.float64)
    if f.has_bias:
        bias = module.bias.detach() if module.bias is not None else w.new_zeros(len(w))
        bias = bias.to(w.device, torch.float64)
        w = torch.cat([w, bias[:, None]], dim=1)
    a_size = f.A.shape[-1]
    if w.shape[1] != a_size or w.shape[0] % f.groups:
        raise ModelError(
            f"K-FAC factors (A of size {a_size}, groups={f.groups}) do not match a layer with "
            f"weight {tuple(module.weight.shape)}; collect them in patch mode for this model"
        )
    return w.reshape(f.groups, -1, w.shape[1])


def factor_blocks(f: KFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``S`` as float64 ``(groups, n, n)`` stacks."""
    return tuple(m.double().reshape(f.groups, m.shape[-1], m.shape[-1]) for m in (f.A, f.S))


def damped_factor(m: torch.Tensor, damping: float) -> torch.Tensor:
    """``M + gamma I`` with ``gamma = damping * mean(diag M)`` per block.

    ``mean(diag M)`` is the mean eigenvalue, so this is ``curvature.eigen.damped``'s
    relative damping.  An all-zero block (e.g. a dead depthwise channel) is damped with the
    factor's overall mean instead, so that it stays invertible.
    """
    mean = m.diagonal(dim1=-2, dim2=-1).mean(-1)
    overall = mean.mean()
    mean = torch.where(mean > 0, mean, overall if overall > 0 else torch.ones_like(mean))
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return 0.5 * (m + m.transpose(-1, -2)) + damping * mean[..., None, None] * eye


def damped_inverse(m: torch.Tensor, damping: float, where: str) -> torch.Tensor:
    """``(M + gamma I)^-1`` by Cholesky (see :func:`damped_factor`); singular -> CurvatureError."""
    chol, info = torch.linalg.cholesky_ex(damped_factor(m, damping))
    if info.any():
        raise CurvatureError(f"{where} is singular; use a damping > 0 (e.g. 1e-3)")
    return torch.cholesky_inverse(chol)


def kron_inverses(f: KFactors, damping: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped ``(A^-1, S^-1)`` stacks of layer ``name``."""
    a, s = factor_blocks(f)
    return (
        damped_inverse(a, damping, f"layer {name!r}: factor A"),
        damped_inverse(s, damping, f"layer {name!r}: factor S"),
    )


def inverse_diag(a_inv: torch.Tensor, s_inv: torch.Tensor) -> torch.Tensor:
    """``[H^-1]_(ij) = [S^-1]_ii [A^-1]_jj``, shaped like ``W`` blocks ``(groups, out, d)``."""
    return s_inv.diagonal(dim1=-2, dim2=-1)[..., None] * a_inv.diagonal(dim1=-2, dim2=-1)[:, None]


def _quad_rows(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``w_i^T A w_i`` for every row, per group block."""
    return torch.einsum("gij,gjk,gik->gi", w, a, w)


def _rows(pruned: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Boolean ``(groups, out/groups)`` mask of the removed rows."""
    mask = torch.zeros(w.shape[0] * w.shape[1], dtype=torch.bool, device=w.device)
    mask[torch.as_tensor(pruned, dtype=torch.long, device=w.device)] = True
    return mask.reshape(w.shape[:2])


class _KFACCriterion(ChannelCriterion):
    needs = frozenset({"kfac"})

    def score(self, model: nn.Module, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        out = {}
        for name in ctx.layers:
            f = require_factors(ctx, name, self.name, diag="diag" in self.needs)
            w = layer_matrix(model.get_submodule(name), f)
            out[name] = self._score(w, f, ctx.damping, name).reshape(-1)
        return out

    @abstractmethod
    def _score(self, w: torch.Tensor, f: KFactors, damping: float, name: str) -> torch.Tensor:
        """Per-output-row ``Delta L`` of one layer's weight matrix ``w``."""

    def _updates(
        self, model: nn.Module, ctx: ScoreContext, pruned: Mapping[str, torch.Tensor], step: Step
    ) -> dict[str, torch.Tensor]:
        """``{layer: step(W, factors, removed-row mask, layer)}`` flattened like ``W``."""
        out = {}
        for name, rows in pruned.items():
            f = require_factors(ctx, name, self.name)
            w = layer_matrix(model.get_submodule(name), f)
            out[name] = step(w, f, _rows(rows, w), name).reshape(-1, w.shape[-1])
        return out


def _s_inverse(f: KFactors, damping: float, name: str) -> torch.Tensor:
    """The damped ``S^-1`` stack of layer ``name``."""
    return damped_inverse(factor_blocks(f)[1], damping, f"layer {name!r}: factor S")


class COBD(_KFACCriterion):
    """C-OBD: ``1/2 sum_j W_ij^2 F_ij`` with the exact diagonal Fisher."""

    name = "c-obd"
    needs = frozenset({"kfac", "diag"})

    def _score(self, w, f, damping, name):
        diag = f.extra["diag"].to(w.device, torch.float64).reshape(w.shape)
        return 0.5 * (w**2 * diag).sum(-1)


class KronOBD(_KFACCriterion):
    """Kron-OBD: ``1/2 S_ii w_i^T A w_i`` (the paper's quadratic form)."""

    name = "kron-obd"

    def _score(self, w, f, damping, name):
        a, s = factor_blocks(f)
        return 0.5 * s.diagonal(dim1=-2, dim2=-1) * _quad_rows(w, a)


class KronOBDOrig(_KFACCriterion):
    """Kron-OBD as the original code computed it: ``1/2 S_ii sum_j ((W o W) A)_ij``."""

    name = "kron-obd-orig"

    def _score(self, w, f, damping, name):
        a, s = factor_blocks(f)
        return 0.5 * s.diagonal(dim1=-2, dim2=-1) * ((w * w) @ a).sum(-1)


class COBS(_KFACCriterion):
    """C-OBS: independent OBS per weight under ``A^-1 (x) S^-1`` (see the module docstring)."""

    name = "c-obs"

    def _score(self, w, f, damping, name):
        a_inv, s_inv = kron_inverses(f, damping, name)
        return 0.5 * (w**2 / inverse_diag(a_inv, s_inv)).sum(-1)

    def update(self, model, ctx, pruned):
        def step(w, f, removed, name):
            a_inv, s_inv = kron_inverses(f, ctx.damping, name)
            c = torch.where(removed[..., None], w / inverse_diag(a_inv, s_inv), 0.0)
            return -(s_inv @ c @ a_inv)

        return self._updates(model, ctx, pruned, step)


class KronOBS(_KFACCriterion):
    """Kron-OBS: row-constrained OBS under ``A (x) S``; joint update of the surviving rows."""

    name = "kron-obs"

    def _score(self, w, f, damping, name):
        a = factor_blocks(f)[0]
        s_inv = _s_inverse(f, damping, name)
        return 0.5 * _quad_rows(w, damped_factor(a, damping)) / s_inv.diagonal(dim1=-2, dim2=-1)

    def update(self, model, ctx, pruned):
        def step(w, f, removed, name):
            return kron_obs_update(w, _s_inverse(f, ctx.damping, name), removed)

        return self._updates(model, ctx, pruned, step)


class KronOBSOrig(_KFACCriterion):
    """Kron-OBS as the original code computed it: ``1/2 sum_j ((W o W) A)_ij / [S^-1]_ii``,
    and the sum of the single-row OBS updates (not the joint optimum); for reproduction."""

    name = "kron-obs-orig"

    def _score(self, w, f, damping, name):
        a = factor_blocks(f)[0]
        s_inv = _s_inverse(f, damping, name)
        return 0.5 * ((w * w) @ a).sum(-1) / s_inv.diagonal(dim1=-2, dim2=-1)

    def update(self, model, ctx, pruned):
        def step(w, f, removed, name):
            s_inv = _s_inverse(f, ctx.damping, name)
            coef = torch.where(removed[..., None], w, 0.0)
            return -(s_inv @ (coef / s_inv.diagonal(dim1=-2, dim2=-1)[..., None]))

        return self._updates(model, ctx, pruned, step)


def kron_obs_update(w: torch.Tensor, s_inv: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``-S^-1[:, P] ([S^-1]_PP)^-1 W_P`` per group block: the exact minimiser of ``q(D)``
    over ``D`` with ``D_P = -W_P`` (rows ``P`` forced to zero)."""
    delta = torch.zeros_like(w)
    for g in range(w.shape[0]):
        p = removed[g].nonzero().flatten()
        if len(p) == 0 or len(p) == w.shape[1]:  # nothing to remove / nothing survives
            continue
        coef = torch.linalg.solve(s_inv[g][p][:, p], w[g][p])
        delta[g] = -s_inv[g][:, p] @ coef
    return delta


for _cls in (COBD, COBS, KronOBD, KronOBDOrig, KronOBS, KronOBSOrig):
    register(_cls())
