"""Eigendecompositions of Kronecker factors: the Kronecker-factored eigenbasis (KFE).

Cost is ``O(d^3)`` per factor and dominated by the few largest ones, so the policy is:

* **precision**: float64 by default (factors of trained nets are badly conditioned); float32
  factors with a side above ``fp32_above`` are decomposed in float32.  Such a factor was
  accumulated in float32 and is only known to ``~eps32 * ||M||``; a float32 ``eigh``
  (backward error of the same order) loses little that float64 could recover from it, at a
  fraction of the cost (accuracy and speed: ``benchmarks/eigh_bench.py``); a float32
  ``eigh`` that does not converge is redone in float64.
* **rank**: a factor summed from fewer vectors than its side (few examples, small feature
  maps, a classifier on one batch) has at most that rank (``KFactors.a_rank_bound``,
  ``s_rank_bound``).  Its range is found exactly by a seeded Gaussian sketch of
  ``k = bound + 8`` columns, the eigenpairs by an ``eigh`` of the projected ``k x k``
  matrix, and the null space by a complete QR: ``O(d^2 k)`` instead of ``O(d^3)``.  The
  result is checked (residual ``||M - Q diag(lam) Q^T||`` within ``1000 eps`` of
  ``max lam``) and recomputed by a full ``eigh`` if it is not.  The null-space eigenvalues
  are exact zeros where a full ``eigh`` returns round-off; the two agree to the working
  precision.
* **scheduling**: on CUDA, factors of equal size are stacked into one batched
  ``torch.linalg.eigh`` call (few kernel launches).  On CPU a batched call is only a loop
  over LAPACK, whose tridiagonal reduction is memory-bound and scales poorly with threads;
  there the factors are spread, largest first, over one worker thread per core, each
  running single-threaded LAPACK.
* **distribution**: under ``torch.distributed`` each rank decomposes a cost-balanced share
  and all results are broadcast (:mod:`.distributed`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ConfigError, CurvatureError
from .distributed import distributed_eigh, group_info
from .factors import KFE, Eigen, KFactors

EighResult = tuple[torch.Tensor, torch.Tensor]
DEFAULT_FP32_ABOVE = 1024
LOW_RANK_OVERSAMPLE = 8  # extra sketch columns beyond the rank bound


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


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


def _eigh(stack: torch.Tensor, dtype: torch.dtype, fallback: torch.dtype) -> EighResult:
    """``eigh`` of a ``(B, d, d)`` stack in ``dtype``; if that does not converge (float32
    divide-and-conquer can fail on the large clusters of ~zero eigenvalues of a factor from
    few examples), once more in ``fallback``."""
    try:
        return torch.linalg.eigh(_sym(stack.to(dtype)))
    except torch.linalg.LinAlgError as err:
        if fallback != dtype:
            return _eigh(stack, fallback, fallback)
        raise CurvatureError(
            f"eigendecomposition of {stack.shape[0]} factor(s) of size {stack.shape[-1]} "
            f"failed ({err}); raise the damping or use more batches"
        ) from err


def _low_rank_eigh(stack: torch.Tensor, rank: int, dtype: torch.dtype) -> EighResult | None:
    """``eigh`` of a ``(B, d, d)`` PSD stack of rank at most ``rank``, in ``O(d^2 k)``
    (module docstring); None when the residual shows the rank bound does not hold."""
    m = _sym(stack.to(dtype))
    d, k = m.shape[-1], rank + LOW_RANK_OVERSAMPLE
    gen = torch.Generator(device=m.device).manual_seed(0)  # reproducible sketch
    sketch = torch.randn(m.shape[0], d, k, generator=gen, dtype=dtype, device=m.device)
    basis = torch.linalg.qr(m @ sketch).Q  # (B, d, k): the range of m
    lam, u = torch.linalg.eigh(_sym(basis.mT @ m @ basis))
    vectors = basis @ u
    residual = (m - (vectors * lam.unsqueeze(-2)) @ vectors.mT).abs().amax(dim=(-2, -1))
    scale = lam.amax(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    if bool((residual > 1000 * torch.finfo(dtype).eps * scale).any()):
        return None
    null = torch.linalg.qr(vectors, mode="complete").Q[..., k:]  # orthonormal complement
    lam = torch.cat([lam.new_zeros(*lam.shape[:-1], d - k), lam], dim=-1)
    q = torch.cat([null, vectors], dim=-1)
    lam, order = lam.sort(dim=-1)
    return lam, q.gather(-1, order.unsqueeze(-2).expand_as(q))


def low_rank_bound(m: torch.Tensor, bound: int | None) -> int | None:
    """``bound`` when the low-rank path pays (sketch at most half the side), else None."""
    useful = bool(bound) and bound + LOW_RANK_OVERSAMPLE <= m.shape[-1] // 2
    return bound if useful else None


def eigh_cost(m: torch.Tensor, bound: int | None = None) -> int:
    """Work of decomposing ``m``: ``d^3`` per matrix, ``d^2 k`` on the low-rank path."""
    return m.numel() * (low_rank_bound(m, bound) or m.shape[-1])


def batched_eigh(
    mats: Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float64,
    batched: bool = True,
    *,
    fp32_above: int | None = None,
    workers: int | None = None,
    rank_bounds: Sequence[int] | None = None,
) -> list[EighResult]:
    """``eigh`` of many symmetric matrices (each ``(..., d, d)``) -> ``(lam, Q)`` per input.

    Eigenvalues are ascending, clipped at 0 (factors are PSD; tiny negative values are
    round-off) and returned with ``Q`` in the input's dtype.  ``batched=False`` is the plain
    sequential loop (the reference).  ``fp32_above``: float32 (or lower) matrices with a
    side larger than this are decomposed in float32 (None: never); float64 input always
    stays float64.  ``workers``: CPU worker threads (default: ``torch.get_num_threads()``).
    ``rank_bounds``: per matrix, an upper bound on its rank (0: unknown); PSD matrices of
    low rank take the ``O(d^2 k)`` path of the module docstring.
    """
    mats = list(mats)
    if not batched:
        return [_finish(m, *_eigh(m.reshape(-1, *m.shape[-2:]), dtype, dtype)) for m in mats]
    given = rank_bounds or [0] * len(mats)
    bounds = [low_rank_bound(m, b) for m, b in zip(mats, given, strict=True)]

    def precision(m: torch.Tensor) -> torch.dtype:
        low = m.dtype.itemsize <= 4 and fp32_above is not None and m.shape[-1] > fp32_above
        return torch.float32 if low else dtype

    results: list[EighResult | None] = [None] * len(mats)
    # one call each: every CPU matrix (worker threads) and every low-rank one (own path)
    single = [i for i, m in enumerate(mats) if m.device.type == "cpu" or bounds[i]]
    singles = set(single)
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        if i not in singles:
            by_size[(m.shape[-1], m.device)].append(i)
    for (d, _), idx in by_size.items():
        stack = torch.cat([mats[i].reshape(-1, d, d) for i in idx])
        lam, q = _eigh(stack, precision(stack), dtype)
        start = 0
        for i in idx:
            count = mats[i].reshape(-1, d, d).shape[0]
            results[i] = _finish(mats[i], lam[start : start + count], q[start : start + count])
            start += count

    def one(i: int) -> EighResult:
        m = mats[i]
        stack = m.reshape(-1, *m.shape[-2:])
        low = _low_rank_eigh(stack, bounds[i], precision(m)) if bounds[i] else None
        return _finish(m, *(low or _eigh(stack, precision(m), dtype)))

    workers = workers or torch.get_num_threads()
    order = sorted(single, key=lambda i: -eigh_cost(mats[i], bounds[i]))  # largest first
    if workers <= 1 or len(order) <= 1:
        for i in order:
            results[i] = one(i)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one LAPACK thread per worker: no oversubscription
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i, res in zip(order, pool.map(one, order), strict=True):
                    results[i] = res
        finally:
            torch.set_num_threads(threads)
    return results  # type: ignore[return-value]


def _finish(m: torch.Tensor, lam: torch.Tensor, q: torch.Tensor) -> EighResult:
    return lam.reshape(m.shape[:-1]).clamp_min(0).to(m.dtype), q.reshape(m.shape).to(m.dtype)


def _diagonal_eigen(diag: torch.Tensor) -> EighResult:
    """Eigendecomposition of ``diag(v)`` (a ``max_dense`` fallback factor): sorted ``v`` and
    the matching permutation matrix, exact and without any ``O(d^3)`` work."""
    lam, order = diag.clamp_min(0).sort(dim=-1)
    eye = torch.eye(diag.shape[-1], dtype=diag.dtype, device=diag.device)
    return lam, eye[:, order] if diag.dim() == 1 else torch.stack([eye[:, o] for o in order])


def eigendecompose(
    factors: dict[str, KFactors],
    *,
    damping: float = 0.0,
    dtype: torch.dtype = torch.float64,
    batched: bool = True,
    drop_bias: bool = False,
    fp32_above: int | None = DEFAULT_FP32_ABOVE,
    distributed: bool | None = None,
) -> dict[str, KFE]:
    """The KFE of every layer: ``A = Q_A diag(lam_A) Q_A^T`` and likewise for ``S``.

    ``damping`` is relative (see :func:`damped`) and applied to the eigenvalues.
    ``drop_bias`` decomposes ``A`` without its bias coordinate.  ``KFE.diag`` is the K-FAC
    Fisher diagonal in the eigenbasis, ``lam_S[o] * lam_A[i]`` (``(..., d_out, d_in)``).
    ``fp32_above`` (default 1024; None = float64 throughout) and the scheduling are
    described in the module docstring.  ``distributed`` (None: whenever a process group
    with several ranks is initialised) splits the work over the ranks; every rank must call.
    """
    names = list(factors)
    mats: list[torch.Tensor] = []
    bounds: list[int] = []
    slots: list[int | EighResult] = []
    for n in names:
        f = factors[n]
        a = f.A_no_bias if drop_bias else f.A
        if f.a_diagonal:
            slots.append(_diagonal_eigen(a))
        else:
            slots.append(len(mats))
            mats.append(a)
            bounds.append(f.a_rank_bound)
        slots.append(len(mats))
        mats.append(f.S)
        bounds.append(f.s_rank_bound)
    # decompose() may get a share of ``mats`` (distributed): find each one's bound by identity
    rank_of = {id(m): b for m, b in zip(mats, bounds, strict=True)}

    def decompose(part: list[torch.Tensor]) -> list[EighResult]:
        return batched_eigh(
            part,
            dtype=dtype,
            batched=batched,
            fp32_above=fp32_above,
            rank_bounds=[rank_of.get(id(m), 0) for m in part],
        )

    info = group_info(distributed)
    if info is None:
        decomposed = decompose(mats)
    else:
        costs = [eigh_cost(m, b) for m, b in zip(mats, bounds, strict=True)]
        decomposed = distributed_eigh(mats, decompose, *info, costs=costs)
    results = [decomposed[s] if isinstance(s, int) else s for s in slots]
    out: dict[str, KFE] = {}
    for k, n in enumerate(names):
        (lam_a, q_a), (lam_s, q_s) = results[2 * k], results[2 * k + 1]
        lam_a, lam_s = damped(lam_a, damping), damped(lam_s, damping)
        out[n] = KFE(
            A=Eigen(q_a, lam_a),
            S=Eigen(q_s, lam_s),
            diag=lam_s.unsqueeze(-1) * lam_a.unsqueeze(-2),
        )
    return out
