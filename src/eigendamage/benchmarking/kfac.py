"""K-FAC collection against a plain forward+backward on the same batches, with a GEMM
model of what each costs (``eigendamage bench kfac``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..curvature import collect_kfac
from ..curvature.hooks import resolve_targets
from ..curvature.types import ConvMode
from ..layers import adapter_of
from .workloads import best_of, build, load_now, plain_step, synthetic_batches


def bench_kfac(
    keys: Sequence[str],
    *,
    batches: int = 3,
    repeats: int = 3,
    device: str = "cpu",
    modes: Sequence[ConvMode] = ("channel", "patch"),
    channels_last: bool = False,
) -> list[dict]:
    """K-FAC collection (true Fisher, one draw) vs plain forward+backward, same batches."""
    return [_kfac_row(k, batches, repeats, device, modes, channels_last) for k in keys]


def flop_model(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """GEMM multiply-adds of one pass, from the layer shapes (other ops ignored): forward,
    backward to the inputs, backward to the weights, and the K-FAC factor GEMMs.

    Per layer with ``M`` output rows: weight gradient ``d_in*d_out*M`` (``d_in`` includes
    the kernel); ``S``: ``d_out^2 * M``; channel ``A``: ``c_in^2`` per pixel read; patch
    ``A``: ``d_in^2 * M``.  Explains ratios that no implementation can beat: e.g. a 1x1
    conv expanding ``C -> 4C`` spends ``16 C^2`` per row on ``S`` against ``4 C^2`` for
    its weight gradient.
    """
    totals = dict.fromkeys(
        ("forward", "input grad", "weight grad", "S", "A channel", "A patch"), 0.0
    )
    first = True

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal first
        inp = args[0]
        adapter = adapter_of(module)
        g = adapter.groups(module)
        c_in = adapter.in_units(module) // g
        d_in = c_in * adapter.kernel_numel(module)
        d_out = adapter.out_units(module) // g
        if adapter.kind == "linear":
            rows = read = out.numel() // out.shape[-1]
        else:  # a conv: rows are output locations; channel A reads each input pixel
            rows = out.shape[0] * out.shape[-1] * out.shape[-2]
            stride = module.stride[0] * module.stride[1] if d_in == c_in else 1
            read = inp.shape[0] * inp.shape[-1] * inp.shape[-2] / max(1, stride)
        mac = g * d_in * d_out * rows
        totals["forward"] += mac
        totals["weight grad"] += mac
        totals["input grad"] += 0 if first else mac
        totals["S"] += g * d_out**2 * rows
        totals["A channel"] += g * c_in**2 * read
        totals["A patch"] += g * d_in**2 * rows
        first = False

    handles = [m.register_forward_hook(hook) for m in resolve_targets(model, None).values()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return totals


def _kfac_row(
    key: str,
    batches: int,
    repeats: int,
    device: str,
    modes: Sequence[ConvMode],
    channels_last: bool,
) -> dict:
    model, w = build(key, device)
    data = synthetic_batches(w, batches, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
    plain_step(model, data[:1])  # warm-up (allocator, oneDNN primitive caches)
    variants: dict[str, Callable[[], object]] = {"plain": lambda: plain_step(model, data)}
    for mode in modes:
        variants[mode] = lambda mode=mode: collect_kfac(model, data, conv_mode=mode)
    t = best_of(variants, repeats, device)
    flops = flop_model(model, data[0][0])
    plain = flops["forward"] + flops["input grad"] + flops["weight grad"]
    row = {"workload": key, "batch": w.batch_size, "batches": batches}
    row["plain fwd+bwd s"] = f"{t['plain']:.2f}"
    for mode in modes:
        row[f"K-FAC {mode} s"] = f"{t[mode]:.2f}"
        row[f"{mode} / plain"] = f"{t[mode] / t['plain']:.2f}x"
        kfac = flops["forward"] + flops["input grad"] + flops["S"] + flops[f"A {mode}"]
        row[f"{mode} GEMM model"] = f"{kfac / plain:.2f}x"
    row["load avg"] = load_now()
    return row
