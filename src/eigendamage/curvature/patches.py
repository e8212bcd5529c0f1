"""Layer inputs and output gradients as matrices of samples (rows) by coordinates.

How a layer's rows are read (im2col patches, token rows, output gradients) is its adapter's
business (:mod:`eigendamage.layers`); this module holds the conv factors' arithmetic.

Conv2d follows the KFC convention: every output location is a sample.  Two views of the
input exist:

* ``patch``: the full im2col patch ``c_in/groups * kh * kw`` (column order of
  ``weight.flatten(1)``), one row per (example, location);
* ``channel``: the input channel vector at every (location, kernel offset) pair, i.e. the
  kernel offsets count as extra samples -- the A factor behind EigenDamage's 1x1 ``Q_A``.
  Its second moment never materialises the unfolding: it equals a per-pixel second moment
  weighted by how many (location, offset) pairs read each pixel (see ``coverage``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..layers import channel_rows, pad_input, padding_amounts


def coverage(conv: nn.Conv2d, padded_hw: tuple[int, int], device, dtype) -> torch.Tensor:
    """How many (output location, kernel offset) pairs read each pixel of the padded input.

    Separable: the count at ``(i, j)`` is the row count at ``i`` times the column count at
    ``j``, each a 1-D histogram computed in Python (cached), so no kernel runs for it.
    """
    rows, cols = (
        _coverage_1d(size, k, d, s)
        for size, k, d, s in zip(
            padded_hw, conv.kernel_size, conv.dilation, conv.stride, strict=True
        )
    )
    return torch.outer(
        torch.tensor(rows, dtype=dtype, device=device),
        torch.tensor(cols, dtype=dtype, device=device),
    )


@functools.lru_cache(maxsize=1024)
def _coverage_1d(size: int, k: int, dilation: int, stride: int) -> tuple[int, ...]:
    counts = [0] * size
    outputs = (size - dilation * (k - 1) - 1) // stride + 1
    for offset in range(k):
        for t in range(outputs):
            counts[offset * dilation + t * stride] += 1
    return tuple(counts)


def conv_output_locations(conv: nn.Conv2d, padded_hw: tuple[int, int]) -> int:
    h, w = padded_hw
    out = []
    for size, k, d, s in zip((h, w), conv.kernel_size, conv.dilation, conv.stride, strict=True):
        out.append((size - d * (k - 1) - 1) // s + 1)
    return out[0] * out[1]


def gram(rows: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``sum_r r r^T`` per group of columns: ``(M, groups*d)`` -> ``(groups, d, d)``."""
    if groups == 1:
        return (rows.T @ rows).unsqueeze(0)
    per_group = rows.view(rows.shape[0], groups, -1).transpose(0, 1)  # (G, M, d), no copy
    return per_group.transpose(1, 2) @ per_group


def channel_second_moment(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int]:
    """Sum over examples, locations and offsets of ``x x^T`` per group, and the sample count.

    Every pixel ``p`` enters ``coverage(p)`` times, so the sum is
    ``sum_{n,p} (sqrt(c_p) x_{n,p}) (sqrt(c_p) x_{n,p})^T``: one weighted copy of ``x`` into
    row layout and one GEMM.  Zero padding contributes nothing, so the input is padded only
    for the other padding modes; pixels no kernel offset reads (e.g. 3 in 4 for a 1x1 conv
    with stride 2) are sliced away before the copy.  Returns ``(M, count)`` with ``M`` of
    shape ``(groups, c/groups, c/groups)``.
    """
    pads = padding_amounts(conv)
    padded_hw = (x.shape[-2] + pads[2] + pads[3], x.shape[-1] + pads[0] + pads[1])
    per_axis = [
        _coverage_1d(size, k, d, s)
        for size, k, d, s in zip(
            padded_hw, conv.kernel_size, conv.dilation, conv.stride, strict=True
        )
    ]
    if conv.padding_mode == "zeros":
        per_axis = [
            counts[start : start + size]
            for counts, start, size in zip(per_axis, (pads[2], pads[0]), x.shape[-2:], strict=True)
        ]
    else:
        x = pad_input(x, conv)
    (sh, hc), (sw, wc) = (_support(counts) for counts in per_axis)
    x = x[:, :, sh, sw]
    n, c, h, w = x.shape
    if all(v == 1 for v in hc + wc):
        rows = channel_rows(x)
    else:
        weighted = x.new_empty(n, h, w, c)
        root = _sqrt_coverage(hc, wc, x.dtype, x.device)
        torch.mul(x.permute(0, 2, 3, 1), root, out=weighted)
        rows = weighted.view(-1, c)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return gram(rows, conv.groups), n * conv_output_locations(conv, padded_hw) * k


@functools.lru_cache(maxsize=256)
def _sqrt_coverage(
    hc: tuple[int, ...], wc: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``sqrt(coverage)`` as an ``(H, W, 1)`` tensor, built once per layer shape and device."""
    rows, cols = (torch.tensor(v, dtype=dtype).sqrt() for v in (hc, wc))
    return torch.outer(rows, cols).unsqueeze(-1).to(device)


def _support(counts: tuple[int, ...]) -> tuple[slice, tuple[int, ...]]:
    """The slice of an axis that holds all its read pixels -- strided when they are evenly
    spaced -- and the counts along it."""
    idx = [i for i, v in enumerate(counts) if v]
    if not idx:
        return slice(0, 0), ()
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if idx != list(range(idx[0], idx[-1] + 1, step)):
        step = 1
    sl = slice(idx[0], idx[-1] + 1, step)
    return sl, counts[sl]


def append_ones(rows: torch.Tensor) -> torch.Tensor:
    """Append the homogeneous coordinate that turns a bias into one more weight column."""
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
