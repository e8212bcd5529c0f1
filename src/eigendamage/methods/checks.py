"""Argument checks and small policies of :func:`eigendamage.methods.loop.run_pruning`.

Why a module of its own: every value a caller passes is checked here, once, before any
work, so a wrong call fails at once with a :class:`ConfigError` that names the argument
instead of hours later (or never: a negative damping used to be escalated silently).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..criteria.amounts import check_fraction, one_budget
from ..curvature.types import EIGENVALUE_SOURCES, FISHER_TYPES, EigenvalueSource, FisherType
from ..errors import ConfigError, ModelError
from ..measure import Counts, count
from ..modelcall import batch_inputs, model_device, to_device
from ..structure.ties import tied_layers


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def check_arguments(
    *,
    ratio: float | None,
    target_params: float | None,
    target_flops: float | None,
    rounds: int,
    per_layer_cap: float,
    fisher: FisherType,
    fisher_batches: int | None,
    fisher_samples: int,
    damping: float | None,
    eigenvalues: EigenvalueSource,
    seed: int,
    start_round: int,
) -> None:
    """Raise :class:`ConfigError` for the first invalid argument of ``run_pruning``."""
    one_budget(ratio, target_params, target_flops)
    _integer("rounds", rounds, 1)
    _integer("start_round", start_round, 1)
    check_fraction("per_layer_cap", per_layer_cap, open_low=True, open_high=False)
    if fisher not in FISHER_TYPES:
        raise ConfigError(f"fisher must be one of {', '.join(FISHER_TYPES)}, got {fisher!r}")
    if fisher_batches is not None:
        _integer("fisher_batches", fisher_batches, 1)
    _integer("fisher_samples", fisher_samples, 1)
    if fisher == "empirical" and fisher_samples != 1:
        raise ConfigError("the empirical Fisher uses the dataset labels: fisher_samples must be 1")
    if damping is not None:
        check_fraction("damping", damping, high=math.inf, open_low=False, open_high=True)
    if eigenvalues not in EIGENVALUE_SOURCES:
        raise ConfigError(f"eigenvalues must be 'kfac' or 'ekfac', got {eigenvalues!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


def check_model(model: Any) -> None:
    """A module with parameters: anything else cannot be pruned (and used to fail deep
    inside with a bare ``StopIteration``)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ModelError(f"{type(model).__name__} has no parameters: there is no layer to prune")


def excluded_roots(model: nn.Module, exclude: Iterable[str] | str | None, default: str | None):
    """``exclude`` checked against the model's module names, plus the default (the output
    layer): user names *add to* the default, they never replace it."""
    names = [n for n, _ in model.named_modules() if n]
    given = [exclude] if isinstance(exclude, str) else list(exclude or ())
    known = set(names)
    for name in given:
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            top = ", ".join(repr(n) for n in names if "." not in n)
            raise ConfigError(
                f"exclude: {type(model).__name__} has no module {name!r}.{hint} "
                f"Names are those of model.named_modules(), e.g. {top or 'none'}."
            )
    return {*given, *([default] if default else [])}


def expand_excluded(model: nn.Module, roots: set[str]) -> set[str]:
    """Every module name equal to or inside one of ``roots`` (excluding a block excludes all
    of its layers); names that no longer exist are dropped."""
    out = set()
    for name, _ in model.named_modules():
        probe = name
        while probe and probe not in roots:
            probe = probe.rpartition(".")[0]
        if probe:
            out.add(name)
    return out


def tie_note(model: nn.Module, excluded: set[str]) -> str | None:
    """One line naming the tied layers a method would otherwise prune, or None (ties of
    embeddings with an excluded output layer, as in language models, need no note)."""
    kinds = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)
    tied = {
        n: why
        for n, why in tied_layers(model).items()
        if n not in excluded and isinstance(model.get_submodule(n), kinds)
    }
    if not tied:
        return None
    ties = "; ".join(sorted(set(tied.values())))
    return (
        f"tied parameters ({ties}) are left unpruned so the tie survives; layers "
        f"{', '.join(repr(n) for n in sorted(tied))} (and channels coupled to them) keep "
        "their size -- pass them in exclude= to silence this"
    )


def match_modes(result: nn.Module, source: nn.Module) -> None:
    """Give every module of ``result`` the train/eval flag of its namesake in ``source``,
    or of its nearest ancestor there (new bottleneck parts take the replaced layer's)."""
    flags = {name: m.training for name, m in source.named_modules()}
    for name, module in result.named_modules():
        probe = name
        while probe not in flags:
            probe = probe.rpartition(".")[0]
        module.training = flags[probe]


def nothing_removed(
    method: str, round_index: int, units: int, eigen: bool, budget: str
) -> ConfigError:
    """The error for a *first* round that removed nothing, saying why that happens
    (``eigen``: the method prunes eigen-directions, which adds one more reason)."""
    why = (
        ", or no layer's pruned bottleneck (Q_A -> core -> Q_S) would be smaller than the "
        "dense layer, which EigenDamage then keeps"
        if eigen
        else ""
    )
    return ConfigError(
        f"round {round_index} of {method} removed nothing from {units} prunable units: "
        f"{budget} rounds down to no unit, or every prunable layer is at its per_layer_cap "
        f"(each layer keeps at least one unit){why}; raise the ratio or per_layer_cap, use "
        "fewer rounds for a budget, or exclude fewer layers"
    )


def infer_inputs(loader: Iterable) -> tuple[tuple[int, ...] | None, Any]:
    """What counting and tracing run on, from the loader's first batch.

    Returns ``(input_shape, None)`` for a floating-point tensor (zeros of ``(1, *shape of one
    example)``, as always), else ``(None, example)``: the first example as the loader gives
    it -- token ids keep their integer dtype, a mapping of keyword inputs loses ``"labels"``.

    Raises:
        ConfigError: the loader is empty or its inputs are neither tensors nor mappings.
    """
    for batch in loader:
        inputs = batch_inputs(batch)
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            return (1, *inputs.shape[1:]), None
        if isinstance(inputs, torch.Tensor | Mapping) and len(inputs):
            return None, _first_example(inputs)
        break
    raise ConfigError(
        "cannot infer the input shape from the loader: pass input_shape, or example_inputs "
        "(a tensor, tuple or dict the model takes)"
    )


def _first_example(inputs: Any) -> Any:
    """``inputs`` cut to their first example along the batch dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1] if inputs.dim() else inputs
    if isinstance(inputs, Mapping):
        return {k: _first_example(v) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(_first_example(v) for v in inputs)
    return inputs


def is_plain_conv_or_linear(module: nn.Module) -> bool:
    """A layer EigenDamage and obd/obs can prune: ``nn.Linear`` or an ungrouped ``nn.Conv2d``."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def no_plain_layer(model: nn.Module, method: str, output: str | None) -> ModelError:
    """The error for a model in which ``method`` finds no layer to prune, naming the layers
    with parameters it cannot prune."""
    found = [
        f"{name!r} ({type(m).__name__})"
        for name, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
        and not is_plain_conv_or_linear(m)
        and not isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    others = f"unsupported: {', '.join(found[:6])}" if found else "it has no other layer"
    return ModelError(
        f"no layer {method} can prune: it prunes nn.Linear and nn.Conv2d (groups=1) "
        f"layers except the output layer {output!r}; {others}"
    )


def example_input(
    model: nn.Module, input_shape: tuple[int, ...] | None, example_inputs: Any = None
) -> Any:
    """What tracing runs on: the user's ``example_inputs`` (as given: a tensor, a tuple of
    positional or a dict of keyword inputs) on the model's device, else zeros of
    ``input_shape`` on its device, in its dtype."""
    ref = next(model.parameters(), None)
    if ref is None:
        raise ModelError(f"{type(model).__name__} has no parameters: there is nothing to prune")
    if example_inputs is not None:
        return to_device(example_inputs, ref.device)
    return torch.zeros(input_shape, device=ref.device, dtype=ref.dtype)


def count_on(
    model: nn.Module, input_shape: tuple[int, ...] | None, example_inputs: Any = None
) -> Counts:
    """:func:`~eigendamage.measure.count` on the user's ``example_inputs`` when given (moved
    to the model's device), else on ``input_shape``."""
    if example_inputs is None:
        return count(model, input_shape)
    return count(model, example_inputs=to_device(example_inputs, model_device(model)))
