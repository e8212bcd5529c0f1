"""Parameter/FLOP counting and latency measurement, the yardsticks of every pruning result.

FLOPs convention: like the pruning literature (EigenDamage, C-OBD, network slimming) we
report the multiply-accumulates (MACs) of weight layers and call them "FLOPs":

* ``Conv1d/2d/3d``: ``output elements * (in_channels / groups) * prod(kernel_size)``;
* ``ConvTranspose1d/2d/3d``: ``input elements * (out_channels / groups) * prod(kernel_size)``;
* ``Linear``: ``output elements * in_features`` (all leading dims of an N-D input count);
* ``MultiheadAttention``: its q/k/v/output projections only, as Linear layers.

Biases, BN, activations, pooling, additions and parameter-free matmuls (attention scores)
are not counted. Counts are for the whole input given, so pass a batch of 1 for per-image
numbers (the default).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .errors import ConfigError, ModelError
from .modelcall import eval_mode, run_model

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


@dataclass(frozen=True, repr=False)
class Counts:
    """Totals plus ``per_layer[name] = (own params, MACs)`` for modules with either.

    ``params`` counts every parameter once (shared ones too, BN included); per-layer params
    are each module's own, so with weight sharing they can add up to more than ``params``.
    Printed, it shows the totals only: the per-layer detail of a large model is hundreds of
    lines (read ``per_layer`` or :meth:`to_dict` for it).
    """

    params: int
    flops: int
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        layers = len(self.per_layer)
        return f"Counts(params={self.params}, flops={self.flops}, per_layer=<{layers} layers>)"

    def __str__(self) -> str:
        return f"params {self.params:,}; FLOPs (MACs) {self.flops:,}"


def _layer_flops(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    """MACs of one call of ``module`` (see the module docstring for the rules)."""
    if isinstance(module, _ConvTransposeNd):
        k = math.prod(module.kernel_size)
        return args[0].numel() * (module.out_channels // module.groups) * k
    if isinstance(module, _ConvNd):
        k = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.MultiheadAttention):
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
        return module.embed_dim * (2 * q.numel() + k.numel() + v.numel())
    return 0


_COUNTED = (_ConvNd, nn.Linear, nn.MultiheadAttention)


def _reference(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ConfigError(
            f"input shape must be positive integers like (1, 3, 32, 32), got {shape}."
        )
    return shape


def _random_input(model: nn.Module, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
    ref = _reference(model)
    dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    if device is None:
        device = ref.device if ref is not None else "cpu"
    gen = torch.Generator().manual_seed(0)  # do not touch the global RNG
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def count(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs: Any = None,
) -> Counts:
    """Count parameters and MACs with one eval-mode, no-grad forward pass.

    ``input_shape=None`` uses the model's registry input size (``model.eigendamage_spec``)
    or (1, 3, 32, 32). ``example_inputs`` (a tensor, a tuple of positional args or a dict of
    keyword args) replaces the random input, for models with non-image inputs. The model's
    train/eval flags are restored and all hooks removed, also when the forward fails.
    """
    if example_inputs is not None and input_shape is not None:
        raise ConfigError("count(): give either input_shape or example_inputs, not both.")
    if example_inputs is None:
        if input_shape is None:
            from .models.registry import SPEC_ATTR, default_input_shape

            has_spec = hasattr(model, SPEC_ATTR)
            input_shape = default_input_shape(model) if has_spec else DEFAULT_INPUT_SHAPE
        example_inputs = _random_input(model, _check_shape(input_shape))

    per_layer: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if own or isinstance(m, _COUNTED):
            per_layer[name] = [own, 0]

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            per_layer[name][1] += _layer_flops(module, args, kwargs, output)

        return hook

    handles = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, _COUNTED):
                handles.append(m.register_forward_hook(make_hook(name), with_kwargs=True))
        with eval_mode(model), torch.no_grad():
            try:
                run_model(model, example_inputs)
            except RuntimeError as e:
                shape = getattr(example_inputs, "shape", None)
                where = f" with input shape {tuple(shape)}" if shape is not None else ""
                raise ModelError(
                    f"count(): forward pass of {type(model).__name__}{where} failed: {e}"
                ) from e
    finally:
        for h in handles:
            h.remove()

    params = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates
    flops = sum(f for _, f in per_layer.values())
    return Counts(params, flops, {k: (p, f) for k, (p, f) in per_layer.items()})


def reduction(before: Counts, after: Counts) -> dict[str, float]:
    """Fractions of params and FLOPs removed (0.7 = 70% pruned), as the paper's tables report."""

    def frac(b: int, a: int) -> float:
        return 1.0 - a / b if b else 0.0

    return {"params": frac(before.params, after.params), "flops": frac(before.flops, after.flops)}


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock forward latency in milliseconds over ``repeats`` timed runs."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    batch_size: int
    device: str
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
) -> LatencyResult:
    """Time forward passes, because FLOPs alone do not predict the speed-up of pruning.

    ``input_shape`` is the full input shape as for :func:`count`; ``batch_size`` replaces its
    first dimension when given. Runs in eval mode under ``torch.inference_mode``; on CUDA the
    device is synchronised around every run. ``threads`` sets torch's intra-op threads for
    the measurement only. A model on another device is copied there, never moved.
    """
    shape = _check_shape(input_shape)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        shape = (batch_size, *shape[1:])
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())

    ref = _reference(model)
    if ref is not None and ref.device != dev:
        model = copy.deepcopy(model).to(dev)
    x = _random_input(model, shape, dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    prev_threads = torch.get_num_threads()
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if threads is not None:
            torch.set_num_threads(prev_threads)

    arr = np.asarray(times)
    return LatencyResult(
        median_ms=float(np.median(arr)),
        p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()),
        repeats=repeats,
        batch_size=shape[0],
        device=str(dev),
        threads=used_threads,
    )
