"""Eigendecomposition variants on the factors of one network: speed and accuracy against
the sequential float64 loop (``eigendamage bench eigh``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..curvature import collect_kfac
from ..curvature.eigen import batched_eigh, low_rank_bound
from ..curvature.factors import KFactors
from ..curvature.types import ConvMode
from .workloads import best_of, build, synthetic_batches


def factor_matrices(factors: dict[str, KFactors]) -> list[torch.Tensor]:
    """The matrices EigenDamage decomposes: ``A`` without bias and ``S`` of every layer."""
    return [m for f in factors.values() for m in (f.A_no_bias, f.S)]


def factor_rank_bounds(factors: dict[str, KFactors]) -> list[int]:
    """The rank bounds of :func:`factor_matrices`, in the same order."""
    return [b for f in factors.values() for b in (f.a_rank_bound, f.s_rank_bound)]


def stacked_eigh(mats: Sequence[torch.Tensor], dtype: torch.dtype) -> list | None:
    """One ``torch.linalg.eigh`` per distinct size on the stacked matrices (what a GPU wants);
    None when LAPACK does not converge."""
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[-1], []).append(i)
    out: list = [None] * len(mats)
    for d, idx in by_size.items():
        stack = torch.cat([mats[i].reshape(-1, d, d) for i in idx]).to(dtype)
        try:
            lam, q = torch.linalg.eigh(0.5 * (stack + stack.transpose(-1, -2)))
        except torch.linalg.LinAlgError:  # reported as a failed variant, not a crash
            return None
        start = 0
        for i in idx:
            n = mats[i].reshape(-1, d, d).shape[0]
            out[i] = (lam[start : start + n], q[start : start + n])
            start += n
    return out


def single_threaded(fn: Callable[[], list]) -> list:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def eigh_variants(mats: list[torch.Tensor], bounds: list[int]) -> dict[str, Callable[[], list]]:
    """The reference first; "1 thread" separates what threading (and, on a shared machine,
    contention on multi-threaded LAPACK) costs from what precision and scheduling gain;
    "rank bounds" is what ``eigendecompose`` does by default."""
    return {
        "sequential loop, fp64 (reference)": lambda: batched_eigh(mats, batched=False),
        "sequential loop, fp64, 1 thread": lambda: single_threaded(
            lambda: batched_eigh(mats, batched=False)
        ),
        "stacked by size, fp64": lambda: stacked_eigh(mats, torch.float64),
        "stacked by size, fp32": lambda: stacked_eigh(mats, torch.float32),
        "workers, fp64": lambda: batched_eigh(mats, fp32_above=None),
        "workers, fp32 above 1024": lambda: batched_eigh(mats, fp32_above=1024),
        "workers, fp32": lambda: batched_eigh(mats, fp32_above=0),
        "workers, fp32 above 1024, rank bounds (default)": lambda: batched_eigh(
            mats, fp32_above=1024, rank_bounds=bounds
        ),
        "workers, fp32, rank bounds": lambda: batched_eigh(mats, fp32_above=0, rank_bounds=bounds),
    }


def _accuracy(results: list, ref: list, mats: list[torch.Tensor]) -> tuple[float, float]:
    """Worst eigenvalue error and worst reconstruction error, both relative to ``max lam``."""
    lam_err = rec_err = 0.0
    for (lam, q), (lam_ref, _), m in zip(results, ref, mats, strict=True):
        lam, q, m = lam.double().reshape(-1, m.shape[-1]), q.double(), m.double()
        scale = float(lam_ref.double().max().clamp_min(1e-300))
        lam_err = max(
            lam_err, float((lam - lam_ref.double().reshape(lam.shape)).abs().max()) / scale
        )
        q = q.reshape(-1, *m.shape[-2:])
        rec = (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2) - m.reshape(q.shape)
        rec_err = max(rec_err, float(rec.abs().max()) / scale)
    return lam_err, rec_err


def bench_eigh(
    key: str = "resnet50-224",
    *,
    conv_mode: ConvMode = "channel",
    batches: int = 1,
    repeats: int = 2,
    device: str = "cpu",
    calibrate: bool = False,
    batch_size: int | None = None,
) -> tuple[list[dict], dict]:
    """All factors of one network (from ``batches`` synthetic batches), decomposed by each
    variant; seconds, speed-up over the sequential float64 loop, and accuracy against it.

    ``calibrate`` also reports how far float32 factors are from float64-accumulated ones
    (on the first 16 examples, to bound memory): the error factors carry before any eigh.
    """
    model, w = build(key, device, batch_size)
    data = synthetic_batches(w, batches, device)
    start = time.perf_counter()
    factors = collect_kfac(model, data, conv_mode=conv_mode)
    collect_s = time.perf_counter() - start
    mats = factor_matrices(factors)
    bounds = factor_rank_bounds(factors)
    variants = eigh_variants(mats, bounds)
    t = best_of(variants, repeats, device)
    ref = variants["sequential loop, fp64 (reference)"]()
    base = t["sequential loop, fp64 (reference)"]
    rows = []
    for name in variants:
        result = variants[name]()
        if result is None:
            rows.append({"variant": name, "seconds": "did not converge (LAPACK error)"})
            continue
        lam_err, rec_err = _accuracy(result, ref, mats)
        rows.append(
            {
                "variant": name,
                "seconds": f"{t[name]:.2f}",
                "speed-up": f"{base / t[name]:.2f}x",
                "max eigenvalue error / max lam": f"{lam_err:.1e}",
                "max reconstruction error / max lam": f"{rec_err:.1e}",
            }
        )
    sizes = sorted((m.shape[-1] for m in mats), reverse=True)
    low = [m.shape[-1] for m, b in zip(mats, bounds, strict=True) if low_rank_bound(m, b)]
    info = {
        "factors": len(mats),
        "low-rank (side)": sorted(low, reverse=True),
        "largest sides": sizes[:8],
        "sum d^3 (G)": round(sum(d**3 for d in sizes) / 1e9, 2),
        "collection s": round(collect_s, 1),
    }
    if calibrate:
        del factors, mats, variants, ref
        info["fp32 factor error / max lam"] = f"{_accumulation_error(model, data, conv_mode):.1e}"
    return rows, info


def _accumulation_error(model: nn.Module, data: list, conv_mode: ConvMode) -> float:
    small = [(x[:16], y[:16]) for x, y in data[:1]]
    low = factor_matrices(collect_kfac(model, small, conv_mode=conv_mode))
    exact = factor_matrices(collect_kfac(model, small, conv_mode=conv_mode, dtype=torch.float64))
    worst = 0.0
    for m, e in zip(low, exact, strict=True):
        scale = float(torch.linalg.eigvalsh(e).max().clamp_min(1e-300))
        worst = max(worst, float((m.double() - e).abs().max()) / scale)
    return worst
