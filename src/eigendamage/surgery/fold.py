"""Rebuild pruned EigenDamage layers in the form that runs fastest, not the one with the
fewest parameters.

Why: pruning picks, per layer, the exact form with the fewest parameters (full bottleneck
``rot_in -> core -> rot_out``, ``rot_out`` or ``rot_in`` folded into the core, or the dense
layer).  Fewer parameters is not less time: every extra module is a kernel launch and a
pass over an activation, and thin layers (odd channel counts, small spatial maps, batch 1)
run far below peak throughput.  So :func:`fold_for_speed` times every exact form of every
bottleneck on the input it actually receives, on this machine and thread count, and keeps
the fastest -- often the collapsed dense layer (the bottleneck folded back into one conv),
sometimes a two-layer factorisation.  All forms compute the same function up to float
round-off (products are formed in float64), so the choice changes speed only.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..modelcall import call_model, eval_mode, model_device, to_device
from .eigenbasis import (
    Form,
    KFEBottleneck,
    build_form,
    form_params,
    is_channel_form,
    set_submodule,
    to_factored,
)


def fold_for_speed(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 10,
    margin: float = 0.05,
    threads: int | None = None,
) -> tuple[nn.Module, dict[str, Form]]:
    """A copy of ``model`` with each :class:`KFEBottleneck` in its fastest exact form.

    ``example_inputs`` is a batch as the model takes it (its shape and batch size are the
    ones timed).  The candidates run ``repeats`` times each, in turns, on the layer's own
    input; the minimum time counts (robust to other load on the machine), denormals flushed
    (:func:`flush_denormals`).  A form replaces
    the current one only when it is faster by more than ``margin`` (relative).  ``threads``
    sets torch's intra-op threads for the timing only.  Returns ``(model copy, {bottleneck
    path: form})``, the form being one of ``full``, ``fold_out``, ``fold_in`` or ``dense``;
    bottlenecks from patch-mode or bias-coordinate factors have no other form and stay.
    """
    new = copy.deepcopy(model)
    names = [n for n, m in new.named_modules() if isinstance(m, KFEBottleneck)]
    inputs = _layer_inputs(new, names, to_device(example_inputs, model_device(new)))
    previous = torch.get_num_threads()
    chosen: dict[str, Form] = {}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad(), flush_denormals():
            for name in names:
                current = new.get_submodule(name).eval()
                if name not in inputs or not is_channel_form(current):
                    continue  # not called on this input, or no other form: leave it as it is
                form = _current_form(current)
                f = to_factored(current)
                candidates = {c: build_form(f, c).eval() for c in _distinct_forms(f) if c != form}
                candidates[form] = current
                times = _best_times(candidates, inputs[name], repeats)
                fastest = min(times, key=times.__getitem__)
                if times[fastest] < times[form] * (1 - margin):
                    form = fastest
                set_submodule(new, name, candidates[form])
                chosen[name] = form
    finally:
        torch.set_num_threads(previous)
    return new, chosen


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Run with denormal floats flushed to zero (CPU), then back to PyTorch's default (off).

    Why: random or heavily pruned weights can drive deep activations into the denormal
    range, where x86 arithmetic is 10-30x slower; timings then measure that, not the
    layers.  Inference deployments usually flush them too.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _layer_inputs(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, Any]:
    """The input tensor of the first call of each named module on ``example_inputs``."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].detach())

        return keep

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _current_form(module: nn.Module) -> Form:
    if not isinstance(module, KFEBottleneck):
        return "dense"
    folded_in = isinstance(module.rot_in, nn.Identity)
    folded_out = isinstance(module.rot_out, nn.Identity)
    return {(False, False): "full", (False, True): "fold_out", (True, False): "fold_in"}.get(
        (folded_in, folded_out), "dense"
    )


def _distinct_forms(f: Any) -> list[Form]:
    """Forms of ``f`` that differ as modules (a folded side makes some forms coincide)."""
    forms: list[Form] = []
    if f.p_in is not None and f.p_out is not None:
        forms.append("full")
    if f.p_in is not None:
        forms.append("fold_out")
    if f.p_out is not None:
        forms.append("fold_in")
    forms.append("dense")
    return sorted(forms, key=lambda form: form_params(f, form))


def _best_times(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Minimum time of each module on ``x``; the modules take turns, so a slow spell of the
    machine hits all of them alike instead of the one that happened to run then."""

    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    for module in modules.values():
        module(x)  # warm-up: first-call allocations and kernel selection
    best = dict.fromkeys(modules, float("inf"))
    for _ in range(repeats):
        for key, module in modules.items():
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            best[key] = min(best[key], time.perf_counter() - start)
    return best
