"""K-FAC factor collection: ``F ~= A (x) S`` per Linear/Conv2d layer, streamed over batches.

Factors are running sums of GEMMs over the batch (no per-example storage), normalised at
the end to the scale convention documented in :mod:`eigendamage.curvature.factors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import ConfigError, CurvatureError
from .factors import KFactors
from .hooks import LayerCall, iterate_layer_calls, resolve_targets
from .patches import (
    append_ones,
    channel_second_moment,
    grad_rows,
    linear_rows,
    unfold_patches,
)

CONV_MODES = ("patch", "channel")
# Upper bound on elements of one chunk of per-example gradients (diagonal Fisher).
_PER_EXAMPLE_CHUNK = 1 << 24


def input_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(N, groups, T, d_in)`` rows, with the bias coordinate when present."""
    if isinstance(module, nn.Conv2d):
        rows = unfold_patches(inputs, module)
    else:
        rows = linear_rows(inputs)
    if module.bias is not None:
        rows = append_ones(rows)
    return rows


class _Accumulator:
    """Running sums for one layer."""

    def __init__(self, module: nn.Module, conv_mode: str, diag: bool, dtype: torch.dtype):
        self.module = module
        self.kind = "linear" if isinstance(module, nn.Linear) else f"conv_{conv_mode}"
        self.want_diag = diag
        self.dtype = dtype
        self.groups = getattr(module, "groups", 1)
        self.has_bias = module.bias is not None and self.kind != "conv_channel"
        self.A: torch.Tensor | None = None
        self.S: torch.Tensor | None = None
        self.diag: torch.Tensor | None = None
        self.a_count = 0

    def add(self, call: LayerCall) -> None:
        g = grad_rows(call.grad_output.to(self.dtype), self.groups)  # (N, G, T, Og)
        groups, og = g.shape[1], g.shape[3]
        g_flat = g.transpose(0, 1).reshape(groups, -1, og)
        self.S = _add(self.S, g_flat.transpose(1, 2) @ g_flat)
        x = call.inputs.to(self.dtype)
        if self.kind == "conv_channel":
            m, count = channel_second_moment(x, self.module)
            self.A = _add(self.A, m)
            self.a_count += count
            return
        a = input_rows(self.module, x)  # (N, G, T, D)
        a_flat = a.transpose(0, 1).reshape(groups, -1, a.shape[-1])
        self.A = _add(self.A, a_flat.transpose(1, 2) @ a_flat)
        self.a_count += a_flat.shape[1]
        if self.want_diag:
            self.diag = _add(self.diag, per_example_square_sum(g, a))

    def finish(self, num_examples: int) -> KFactors:
        if self.A is None or self.S is None:
            raise CurvatureError(f"layer of kind {self.kind} never received data")
        squeeze = (lambda t: t[0]) if self.groups == 1 else (lambda t: t)
        extra = {}
        if self.diag is not None:
            # (G, Og, D) -> (out, D): output channels are group-major.
            extra["diag"] = self.diag.reshape(-1, self.diag.shape[-1]) / num_examples
        return KFactors(
            A=squeeze(self.A / max(self.a_count, 1)),
            S=squeeze(self.S / num_examples),
            kind=self.kind,
            has_bias=self.has_bias,
            groups=self.groups,
            num_examples=num_examples,
            extra=extra,
        )


def per_example_square_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_n G_n**2`` with ``G_n = sum_t g_{n,t} a_{n,t}^T``, in chunks of examples.

    ``g``: ``(N, G, T, Og)``, ``a``: ``(N, G, T, D)``; returns ``(G, Og, D)``.
    """
    n, groups, _, og = g.shape
    d = a.shape[-1]
    chunk = max(1, _PER_EXAMPLE_CHUNK // max(1, groups * og * d))
    total = g.new_zeros(groups, og, d)
    for start in range(0, n, chunk):
        grads = torch.einsum("ngto,ngtd->ngod", g[start : start + chunk], a[start : start + chunk])
        total += grads.square().sum(0)
    return total


def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if acc is None else acc.add_(value)


def collect_kfac(
    model: nn.Module,
    loader: Iterable,
    *,
    fisher: str = "true",
    batches: int | None = None,
    samples: int = 1,
    conv_mode: str = "patch",
    modules: Iterable[str] | Iterable[nn.Module] | None = None,
    diag: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, KFactors]:
    """Estimate K-FAC factors of every Linear/Conv2d layer (or of ``modules``).

    Args:
        fisher: ``"true"`` samples labels from the model (the Fisher proper);
            ``"empirical"`` uses the dataset's labels.
        batches: use only the first ``batches`` batches of ``loader`` (all when None).
        samples: label draws per input for the true Fisher (one backward each).
        conv_mode: ``"patch"`` (A over ``c_in*kh*kw``) or ``"channel"`` (A over ``c_in``,
            kernel offsets as samples; EigenDamage's 1x1 Q_A; no bias coordinate).
        diag: also estimate the exact diagonal Fisher (``extra["diag"]``, shaped like
            ``weight.flatten(1)`` plus a bias column) from per-example gradients.
        dtype: accumulation dtype (float32, or float64 for reference computations).
        progress: called with the batch index after each batch.

    The model's parameters, ``.grad``, ``requires_grad`` flags, train/eval modes and
    BatchNorm statistics are left exactly as they were.
    """
    if conv_mode not in CONV_MODES:
        raise ConfigError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    if diag and conv_mode == "channel":
        raise ConfigError("the diagonal Fisher is defined in patch mode (conv_mode='patch')")
    targets = resolve_targets(model, modules)
    accs = {n: _Accumulator(m, conv_mode, diag, dtype) for n, m in targets.items()}
    num_examples = 0
    for step, (n, per_layer) in enumerate(
        iterate_layer_calls(
            model,
            loader,
            targets,
            fisher=fisher,
            batches=batches,
            samples=samples,
            seed=seed,
            device=device,
        )
    ):
        num_examples += n
        for name, calls in per_layer.items():
            for call in calls:
                accs[name].add(call)
        if progress is not None:
            progress(step)
    if num_examples == 0:
        raise CurvatureError("the data loader yielded no batches: cannot estimate curvature")
    factors = {name: acc.finish(num_examples) for name, acc in accs.items()}
    check_finite(factors)
    return factors


def check_finite(factors: dict[str, KFactors]) -> None:
    """Raise a clear error naming the first layer whose factors hold NaN or Inf."""
    for name, f in factors.items():
        for label, t in (("A", f.A), ("S", f.S)):
            if not torch.isfinite(t).all():
                raise CurvatureError(
                    f"layer {name!r}: the K-FAC factor {label} holds NaN/Inf; check the data "
                    "for NaN/Inf and lower the learning rate the model was trained with"
                )
