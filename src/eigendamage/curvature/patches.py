"""Layer inputs and output gradients as matrices of samples (rows) by coordinates.

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

import torch
import torch.nn.functional as F
from torch import nn


def pad_input(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply a conv's padding explicitly (so every padding mode is handled alike)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x
        # 'same': total padding dilation*(k-1), extra on the right/bottom like PyTorch.
        pads: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = conv.padding
        pads = [pw, pw, ph, ph]
    if not any(pads):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def unfold_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col: ``(N, groups, T, c_in/groups*kh*kw)`` patches in ``weight.flatten(1)`` order."""
    xp = pad_input(x, conv)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    n, ck, t = cols.shape
    g = conv.groups
    # unfold orders channels major, offsets minor: matches weight.flatten(1) per group.
    return cols.view(n, g, ck // g, t).transpose(2, 3)


def coverage(conv: nn.Conv2d, padded_hw: tuple[int, int], device, dtype) -> torch.Tensor:
    """How many (output location, kernel offset) pairs read each pixel of the padded input."""
    ones = torch.ones(1, 1, *padded_hw, device=device, dtype=dtype)
    cols = F.unfold(ones, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return F.fold(cols, padded_hw, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)[
        0, 0
    ]


def conv_output_locations(conv: nn.Conv2d, padded_hw: tuple[int, int]) -> int:
    h, w = padded_hw
    out = []
    for size, k, d, s in zip((h, w), conv.kernel_size, conv.dilation, conv.stride, strict=True):
        out.append((size - d * (k - 1) - 1) // s + 1)
    return out[0] * out[1]


def channel_second_moment(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int]:
    """Sum over examples, locations and offsets of ``x x^T`` per group, and the sample count.

    Returns ``(M, count)`` with ``M`` of shape ``(groups, c/groups, c/groups)``.
    """
    xp = pad_input(x, conv)
    n, c, h, w = xp.shape
    cov = coverage(conv, (h, w), xp.device, xp.dtype).reshape(-1)
    g = conv.groups
    flat = xp.reshape(n, g, c // g, h * w).permute(1, 2, 0, 3).reshape(g, c // g, n * h * w)
    weighted = flat * cov.repeat(n)
    m = weighted @ flat.transpose(1, 2)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return m, n * conv_output_locations(conv, (h, w)) * k


def grad_rows(grad_output: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Output gradients as ``(N, groups, T, d_out/groups)`` (T = locations or tokens)."""
    if grad_output.dim() == 4:  # conv: (N, O, H, W)
        n, o = grad_output.shape[:2]
        return grad_output.reshape(n, groups, o // groups, -1).transpose(2, 3)
    n, o = grad_output.shape[0], grad_output.shape[-1]
    return grad_output.reshape(n, 1, -1, o)


def linear_rows(inputs: torch.Tensor) -> torch.Tensor:
    """Linear inputs as ``(N, 1, T, in_features)`` (T = tokens, 1 for plain vectors)."""
    return inputs.reshape(inputs.shape[0], 1, -1, inputs.shape[-1])


def append_ones(rows: torch.Tensor) -> torch.Tensor:
    """Append the homogeneous coordinate that turns a bias into one more weight column."""
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
