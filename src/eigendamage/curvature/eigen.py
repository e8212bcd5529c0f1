"""Eigendecompositions of Kronecker factors: the Kronecker-factored eigenbasis (KFE).

Factors of equal size are stacked and decomposed in one batched ``torch.linalg.eigh`` call
(far fewer kernel launches / LAPACK calls than a Python loop), in float64 by default since
factors of trained nets are badly conditioned.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import ConfigError, CurvatureError
from .factors import KFE, Eigen, KFactors


def damped(lam: torch.Tensor, damping: float) -> torch.Tensor:
    """Relative Tikhonov damping: ``lam + damping * mean(lam)`` (per factor / group).

    Relative damping keeps the same meaning for every layer whatever its scale, which a
    global ranking across layers needs.
    """
    if damping < 0:
        raise ConfigError(f"damping must be >= 0, got {damping}")
    if damping == 0:
        return lam
    return lam + damping * lam.mean(dim=-1, keepdim=True)


def batched_eigh(
    mats: list[torch.Tensor], dtype: torch.dtype = torch.float64, batched: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``eigh`` of many symmetric matrices (each ``(..., d, d)``), batched by size.

    Returns ``(lam, Q)`` per input with eigenvalues clipped at 0 (factors are PSD; tiny
    negative values are round-off) and in the input's dtype.
    """
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mats)
    if not batched:
        for i, m in enumerate(mats):
            lam, q = torch.linalg.eigh(_sym(m.to(dtype)))
            results[i] = (lam.clamp_min(0).to(m.dtype), q.to(m.dtype))
        return results  # type: ignore[return-value]
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        by_size[(m.shape[-1], m.device)].append(i)
    for (d, _), idx in by_size.items():
        stack = torch.cat([mats[i].reshape(-1, d, d) for i in idx]).to(dtype)
        try:
            lam, q = torch.linalg.eigh(_sym(stack))
        except torch.linalg.LinAlgError as err:  # pragma: no cover - LAPACK failure
            raise CurvatureError(
                f"eigendecomposition of {len(idx)} factor(s) of size {d} failed ({err}); "
                "raise the damping or use more batches"
            ) from err
        start = 0
        for i in idx:
            m = mats[i]
            count = m.reshape(-1, d, d).shape[0]
            lam_i = lam[start : start + count].reshape(*m.shape[:-1])
            q_i = q[start : start + count].reshape(m.shape)
            results[i] = (lam_i.clamp_min(0).to(m.dtype), q_i.to(m.dtype))
            start += count
    return results  # type: ignore[return-value]


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


def eigendecompose(
    factors: dict[str, KFactors],
    *,
    damping: float = 0.0,
    dtype: torch.dtype = torch.float64,
    batched: bool = True,
    drop_bias: bool = False,
) -> dict[str, KFE]:
    """The KFE of every layer: ``A = Q_A diag(lam_A) Q_A^T`` and likewise for ``S``.

    ``damping`` is relative (see :func:`damped`) and applied to the eigenvalues.
    ``drop_bias`` decomposes ``A`` without its bias coordinate.  ``KFE.diag`` is the K-FAC
    Fisher diagonal in the eigenbasis, ``lam_S[o] * lam_A[i]`` (``(..., d_out, d_in)``).
    """
    names = list(factors)
    mats: list[torch.Tensor] = []
    for n in names:
        f = factors[n]
        mats += [f.A_no_bias if drop_bias else f.A, f.S]
    decomposed = batched_eigh(mats, dtype=dtype, batched=batched)
    out: dict[str, KFE] = {}
    for k, n in enumerate(names):
        (lam_a, q_a), (lam_s, q_s) = decomposed[2 * k], decomposed[2 * k + 1]
        lam_a, lam_s = damped(lam_a, damping), damped(lam_s, damping)
        out[n] = KFE(
            A=Eigen(q_a, lam_a),
            S=Eigen(q_s, lam_s),
            diag=lam_s.unsqueeze(-1) * lam_a.unsqueeze(-2),
        )
    return out
