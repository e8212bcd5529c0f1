"""K-FAC factor collection: ``F ~= A (x) S`` per Linear/Conv2d layer, streamed over batches.

Factors are running sums of GEMMs over the batch (no per-example storage: peak memory is one
batch's activations plus the factors), normalised at the end to the scale convention
documented in :mod:`eigendamage.curvature.factors`.

* ``A`` depends on the inputs only, so with several label draws per batch (``samples > 1``)
  it is accumulated once per batch, not once per draw.
* ``max_dense`` caps the side of a dense ``A``: a larger one (e.g. a Linear with 25k inputs,
  or a patch-mode conv A over ``c_in*kh*kw``) is kept as its diagonal, computed without
  materialising the unfolded patches.  Memory ``O(d)`` instead of ``O(d^2)``, no ``O(d^3)``
  eigendecomposition; the price is ignoring input correlations in that layer.
* Under ``torch.distributed`` each rank takes every ``world_size``-th batch and the sums and
  counts are all-reduced before normalising (see :mod:`.distributed`), so every rank ends
  with the single-process factors of the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, CurvatureError
from ..layers import adapter_of, linear_rows, pad_input
from ..modelcall import model_device
from .distributed import all_reduce_sum_, group_info
from .factors import KFactors
from .hooks import DataPass, LayerCall, resolve_targets
from .patches import (
    append_ones,
    channel_second_moment,
    conv_output_locations,
    coverage,
    gram,
)
from .types import CONV_MODES, ConvMode, FactorKind, FisherType, factor_kind

logger = logging.getLogger("eigendamage")

# Upper bound on elements of one chunk of per-example gradients (diagonal Fisher).
_PER_EXAMPLE_CHUNK = 1 << 24


def input_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(N, groups, T, d_in)`` rows, with the bias coordinate when present."""
    rows = adapter_of(module).input_rows(module, inputs)
    if module.bias is not None:
        rows = append_ones(rows)
    return rows


def factor_sides(module: nn.Module, kind: FactorKind) -> tuple[int, int, int]:
    """``(groups, side of A, side of S)`` per group, from the layer's shape alone."""
    adapter = adapter_of(module)
    bias = int(module.bias is not None and kind != "conv_channel")
    g = adapter.groups(module)
    k = adapter.kernel_numel(module) if kind == "conv_patch" else 1
    return g, adapter.in_units(module) // g * k + bias, adapter.out_units(module) // g


def input_gram(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``sum a a^T`` over rows per group (``(G, D, D)``, bias coordinate included) and the
    row count.  The bias row/column -- the row sums and the count -- is filled in after
    the GEMM instead of appending a column of ones, which would copy all the rows."""
    rows = adapter_of(module).input_rows(module, x)
    flat = rows.transpose(0, 1).reshape(rows.shape[1], -1, rows.shape[-1])  # (G, M, D)
    moment = flat.transpose(1, 2) @ flat
    if module.bias is None:
        return moment, flat.shape[1]
    g, d = moment.shape[0], moment.shape[-1]
    out = moment.new_empty(g, d + 1, d + 1)
    out[:, :d, :d] = moment
    sums = flat.sum(1)
    out[:, :d, d] = sums
    out[:, d, :d] = sums
    out[:, d, d] = flat.shape[1]
    return out, flat.shape[1]


class _Accumulator:
    """Running sums for one layer (``A``, ``S``, optional diagonal Fisher) and row counts."""

    def __init__(
        self,
        module: nn.Module,
        conv_mode: ConvMode,
        diag: bool,
        dtype: torch.dtype,
        max_dense: int | None,
    ):
        self.module = module
        self.adapter = adapter_of(module)
        self.kind = factor_kind(self.adapter.kind == "linear", conv_mode)
        self.want_diag = diag
        self.dtype = dtype
        self.max_dense = max_dense
        self.groups = self.adapter.groups(module)
        self.has_bias = module.bias is not None and self.kind != "conv_channel"
        self.A: torch.Tensor | None = None
        self.S: torch.Tensor | None = None
        self.diag: torch.Tensor | None = None
        self.a_count = 0
        self.a_rows = self.s_rows = 0  # vectors summed: rank bounds

    @property
    def a_diagonal(self) -> bool:
        """Keep only diag(A)?  Decided from the layer's shape, so every rank agrees."""
        return (
            self.max_dense is not None and factor_sides(self.module, self.kind)[1] > self.max_dense
        )

    def add(self, call: LayerCall) -> None:
        grad = call.grad_output.to(self.dtype)
        out_rows = self.adapter.output_matrix(grad)
        self.S = _add(self.S, gram(out_rows, self.groups))
        self.s_rows += out_rows.shape[0]
        x = call.inputs.to(self.dtype)
        if self.want_diag:
            g = self.adapter.output_rows(grad, self.groups)
            a = input_rows(self.module, x)
            self.diag = _add(self.diag, per_example_square_sum(g, a))
        if call.draw > 0:
            return  # A depends on the inputs only: one accumulation per batch
        if self.a_diagonal:
            m, count = diagonal_second_moment(x, self.module, self.kind)
        elif self.kind == "conv_channel":
            m, count = channel_second_moment(x, self.module)
        else:
            m, count = input_gram(self.module, x)
        self.A = _add(self.A, m)
        self.a_count += count
        self.a_rows += _input_vectors(self.module, self.kind, x, call.grad_output)

    def sums(self, device: torch.device) -> list[torch.Tensor]:
        """The running sums (zeros where this process saw no data), for an all-reduce."""
        g, da, ds = factor_sides(self.module, self.kind)
        if self.A is None:
            shape = (g, da) if self.a_diagonal else (g, da, da)
            self.A = torch.zeros(shape, dtype=self.dtype, device=device)
        if self.S is None:
            self.S = torch.zeros(g, ds, ds, dtype=self.dtype, device=device)
        if self.want_diag and self.diag is None:  # diag implies patch mode: D = side of A
            self.diag = torch.zeros(g, ds, da, dtype=self.dtype, device=device)
        return [t for t in (self.A, self.S, self.diag) if t is not None]

    def finish(self, num_examples: int) -> KFactors:
        if self.A is None or self.S is None or self.a_count == 0:
            raise CurvatureError(f"layer of kind {self.kind} never received data")
        squeeze = (lambda t: t[0]) if self.groups == 1 else (lambda t: t)
        extra = {}
        if self.diag is not None:
            # (G, Og, D) -> (out, D): output channels are group-major.
            extra["diag"] = self.diag.reshape(-1, self.diag.shape[-1]) / num_examples
        a, s = squeeze(self.A / self.a_count), squeeze(self.S / num_examples)
        factors = KFactors(a, s, self.kind, self.has_bias, self.groups, num_examples, extra)
        factors.a_diagonal, factors.a_count = self.a_diagonal, self.a_count
        factors.a_rank_bound, factors.s_rank_bound = self.a_rows, self.s_rows
        return factors


def _input_vectors(module: nn.Module, kind: FactorKind, x: torch.Tensor, grad: torch.Tensor) -> int:
    """How many vectors one call adds to ``A``'s sum (per group), a bound on its rank:
    input rows for Linear, pixels for channel mode (padding only repeats pixels or adds
    zeros), output locations for patch mode."""
    if kind == "linear":
        return x.numel() // x.shape[-1]
    if kind == "conv_channel":
        return x.shape[0] * x.shape[-2] * x.shape[-1]
    return grad.shape[0] * grad.shape[-2] * grad.shape[-1]


def diagonal_second_moment(
    x: torch.Tensor, module: nn.Module, kind: FactorKind
) -> tuple[torch.Tensor, int]:
    """``diag(sum a a^T)`` per group (``(G, D)``) and the row count, never unfolding ``x``.

    Patch mode: the squared input summed over examples, unfolded once (one image, not N)
    and summed over locations.  Channel mode: squares weighted by the pixel coverage.
    """
    if kind == "linear":
        rows = linear_rows(x)[:, 0].reshape(-1, x.shape[-1])
        d = rows.square().sum(0, keepdim=True)
        count = rows.shape[0]
    else:
        xp = pad_input(x, module)
        sq = xp.square().sum(0, keepdim=True)  # (1, C, H, W)
        if kind == "conv_channel":
            cov = coverage(module, xp.shape[-2:], xp.device, xp.dtype)
            d = (sq[0] * cov).sum((-1, -2))
            k = module.kernel_size[0] * module.kernel_size[1]
            count = x.shape[0] * conv_output_locations(module, xp.shape[-2:]) * k
        else:
            cols = F.unfold(sq, module.kernel_size, dilation=module.dilation, stride=module.stride)
            d = cols[0].sum(-1)
            count = x.shape[0] * cols.shape[-1]
        d = d.reshape(module.groups, -1)
    if module.bias is not None and kind != "conv_channel":
        d = torch.cat([d, d.new_full((d.shape[0], 1), count)], dim=-1)
    return d, int(count)


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
    fisher: FisherType = "true",
    batches: int | None = None,
    samples: int = 1,
    conv_mode: ConvMode = "patch",
    modules: Iterable[str] | Iterable[nn.Module] | None = None,
    diag: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
    max_dense: int | None = None,
    distributed: bool | None = None,
    shard_batches: bool = True,
) -> dict[str, KFactors]:
    """Estimate K-FAC factors of every Linear/Conv2d layer (or of ``modules``).

    Args:
        model: the network; it is only read.
        loader: an iterable of ``(inputs, targets)`` batches.
        fisher: ``"true"`` samples labels from the model (the Fisher proper);
            ``"empirical"`` uses the dataset's labels.
        batches: use only the first ``batches`` batches of ``loader`` (all when None).
        samples: label draws per input for the true Fisher (one backward each).
        conv_mode: ``"patch"`` (A over ``c_in*kh*kw``) or ``"channel"`` (A over ``c_in``,
            kernel offsets as samples; EigenDamage's 1x1 Q_A; no bias coordinate).
            :func:`~eigendamage.surgery.to_eigenbasis` takes either.
        modules: names or modules of the layers to collect on; None: every plain
            Linear/Conv2d that the forward pass calls.
        diag: also estimate the exact diagonal Fisher (``extra["diag"]``, shaped like
            ``weight.flatten(1)`` plus a bias column) from per-example gradients.
        dtype: accumulation dtype (float32, or float64 for reference computations).
        progress: called with the batch's index in the loader after each batch that this
            process computed.
        max_dense: layers whose A side (per group, bias included) exceeds this keep only
            diag(A) (``KFactors.a_diagonal``); None: always dense.
        distributed: all-reduce over the default process group; None: whenever one with
            several ranks is initialised.  Every rank must call with the same arguments.
        shard_batches: when distributed, rank ``r`` computes the batches ``i`` with
            ``i % world_size == r`` (every rank iterates the same loader; ``batches`` counts
            batches overall).  False: the loader is already split per rank (e.g. by a
            ``DistributedSampler``) and ``batches`` counts per rank.

    The model's parameters, ``.grad``, ``requires_grad`` flags, train/eval modes and
    BatchNorm statistics are left exactly as they were.

    Returns:
        ``{layer name: KFactors}``.  With ``modules=None`` (every plain Linear/Conv2d),
        layers the forward pass never calls (auxiliary heads in eval mode, the
        ``out_proj`` of ``nn.MultiheadAttention``) are left out and logged at INFO level.

    Raises:
        ConfigError: an invalid option or combination of options.
        ModelError: a requested module is not a plain Linear/Conv2d of the model.
        CurvatureError: no data, non-finite factors, or a requested layer never called.
    """
    if conv_mode not in CONV_MODES:
        raise ConfigError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    if diag and conv_mode == "channel":
        raise ConfigError("the diagonal Fisher is defined in patch mode (conv_mode='patch')")
    if max_dense is not None and max_dense < 1:
        raise ConfigError(f"max_dense must be >= 1 or None, got {max_dense}")
    info = group_info(distributed)
    targets = resolve_targets(model, modules)
    accs = {n: _Accumulator(m, conv_mode, diag, dtype, max_dense) for n, m in targets.items()}
    num_examples = 0
    data = DataPass(fisher=fisher, batches=batches, samples=samples, seed=seed, device=device)
    for n, per_layer in data.layer_calls(model, loader, targets, info if shard_batches else None):
        num_examples += n  # once per label draw: S sums over draws, A over inputs only
        for name, calls in per_layer.items():
            for call in calls:
                accs[name].add(call)
        first = next(c for calls in per_layer.values() for c in calls)
        if progress is not None and first.draw == samples - 1:
            progress(first.batch)
    if info is not None:
        num_examples = _all_reduce_accumulators(accs, num_examples, device, model)
    if num_examples == 0:
        raise CurvatureError("the data loader yielded no batches: cannot estimate curvature")
    factors = {
        name: acc.finish(num_examples)
        for name, acc in accs.items()
        if not _never_called(name, acc, requested=modules is not None)
    }
    check_finite(factors)
    return factors


def _never_called(name: str, acc: _Accumulator, *, requested: bool) -> bool:
    """True for a layer the forward pass never called, left out of the default targets
    (GoogLeNet's auxiliary heads in eval mode, ``nn.MultiheadAttention.out_proj``): it has
    no curvature to estimate.  A layer the caller asked for by name is an error."""
    if acc.a_count > 0:
        return False
    if requested:
        raise CurvatureError(
            f"layer {name!r} was never called in the forward pass, so it has no K-FAC "
            "factors: leave it out of `modules` (when pruning: `exclude` it)"
        )
    logger.info("collect_kfac: layer %r is never called in the forward pass; left out", name)
    return True


def _all_reduce_accumulators(
    accs: dict[str, _Accumulator],
    num_examples: int,
    device: torch.device | str | None,
    model: nn.Module,
) -> int:
    """Sum every rank's running sums and counts in place; returns the global example count."""
    dev = torch.device(device) if device is not None else model_device(model)
    tensors = [t for acc in accs.values() for t in acc.sums(dev)]
    per_layer = [(acc.a_count, acc.a_rows, acc.s_rows) for acc in accs.values()]
    counts = torch.tensor(
        [num_examples, *(c for row in per_layer for c in row)], dtype=torch.float64, device=dev
    )
    all_reduce_sum_([*tensors, counts])
    summed = counts[1:].reshape(-1, 3).long().tolist()
    for acc, (a_count, a_rows, s_rows) in zip(accs.values(), summed, strict=True):
        acc.a_count, acc.a_rows, acc.s_rows = a_count, a_rows, s_rows
    return int(counts[0].item())


def check_finite(factors: dict[str, KFactors]) -> None:
    """Raise a clear error naming the first layer whose factors hold NaN or Inf."""
    for name, f in factors.items():
        for label, t in (("A", f.A), ("S", f.S)):
            if not torch.isfinite(t).all():
                raise CurvatureError(
                    f"layer {name!r}: the K-FAC factor {label} holds NaN/Inf; check the data "
                    "for NaN/Inf and lower the learning rate the model was trained with"
                )
