"""The pruning loop: collect curvature -> score -> plan -> cut -> fine-tune, per round.

``prune()`` is the one entry point for every method.  Iterative rounds prune the already
pruned model again (EigenDamage re-estimates K-FAC on the bottleneck cores and merges the
new eigenbases into the old, so bottlenecks never stack).  Each round is
``method.round(model, loader, spec)`` of a :class:`~.base.Method`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..criteria.amounts import one_budget
from ..criteria.eigendamage import classifier_name
from ..curvature.types import EigenvalueSource, FisherType
from ..errors import ConfigError
from ..measure import Counts
from .base import Method, Metric, RoundInfo, RoundSpec, Target
from .checks import (
    check_arguments,
    check_model,
    count_on,
    excluded_roots,
    expand_excluded,
    infer_inputs,
    match_modes,
    nothing_removed,
    tie_note,
)
from .registry import check_normalize, get_method

FineTune = Callable[[nn.Module, int], None]
logger = logging.getLogger("eigendamage")


@dataclass
class PruneResult:
    """The pruned model, the counts before and after, and what every round did."""

    model: nn.Module
    before: Counts
    after: Counts
    rounds: list[RoundInfo]

    @property
    def params_kept(self) -> float:
        return self.after.params / self.before.params

    @property
    def flops_kept(self) -> float:
        return self.after.flops / self.before.flops


def prune(model: nn.Module, loader: Iterable, **kwargs) -> nn.Module:
    """Prune ``model`` and return the new, smaller module (see :func:`run_pruning`)."""
    return run_pruning(model, loader, **kwargs).model


def run_pruning(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str | Method = "eigendamage",
    ratio: float | None = None,
    target_params: float | None = None,
    target_flops: float | None = None,
    rounds: int = 1,
    input_shape: tuple[int, ...] | None = None,
    per_layer_cap: float = 0.95,
    fisher: FisherType = "true",
    fisher_batches: int | None = None,
    fisher_samples: int = 1,
    damping: float | None = None,
    exclude: Iterable[str] | None = None,
    finetune: FineTune | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
    start_round: int = 1,
    reference: Counts | None = None,
    on_round: Callable[[nn.Module, RoundInfo], None] | None = None,
    before_round: Callable[[int], None] | None = None,
    eigenvalues: EigenvalueSource = "kfac",
    normalize: bool = False,
    example_inputs: Any = None,
) -> PruneResult:
    """Prune with ``method`` over ``rounds`` rounds; ``model`` itself is not modified.

    Budget: exactly one of ``ratio`` (fraction of units removed *per round*, as in the
    paper: eigen-directions for EigenDamage, channels for channel methods, weights still
    standing for obd/obs), ``target_params`` or ``target_flops`` (fraction of the original
    model *kept* after the last round; intermediate rounds aim at the geometric schedule
    ``target**(r/rounds)``; a round whose target the model already meets is skipped).
    ``exclude`` names modules never pruned (a block excludes all its layers), *in addition*
    to the output layer; unknown names are a :class:`ConfigError`.  Layers sharing a tied
    parameter are never pruned, so ties survive.  ``finetune(model, round)`` trains the
    model in place after each round.  The result has the train/eval modes of ``model``.

    Stopping: a round that removes nothing (every layer at ``per_layer_cap`` or at one unit,
    or the ratio rounds down to no unit) ends the loop -- further rounds would only repeat
    it.  Round 1 removing nothing is a :class:`ConfigError` (the settings prune nothing at
    all); a later one is logged ("round k removed nothing: stopping after k-1 rounds") and
    the result so far is returned, without calling ``finetune`` or ``on_round`` for it.

    Progress: ``log`` (None: quiet) takes a line per stage of every round (curvature,
    eigendecomposition, scoring, surgery: each when it starts and with its seconds when it
    ends) and one per finished round.

    Resuming: pass the model saved after round ``start_round - 1`` with ``start_round`` and
    the ``reference`` counts of the original model; ``on_round(model, info)`` is called after
    each finished round (pruned and fine-tuned), ``before_round(round)`` before its curvature
    pass (e.g. to reseed the loader).  Weight-level methods (obd/obs) keep their zeros
    through fine-tuning: the pruned weights' gradients are masked.  ``normalize`` (channel
    criteria only) divides each layer's scores by their sum before the global ranking.
    ``method`` is a name of :func:`~.registry.available_methods` or a :class:`~.base.Method`
    (see :func:`~.registry.register_method`); an unknown name is a :class:`ConfigError`.

    Inputs: params and FLOPs are counted (and channel groups traced) on ``example_inputs``
    as given -- a tensor, a tuple of positional or a dict of keyword inputs, e.g.
    ``{"input_ids": ids[:1]}`` for a Hugging Face model -- or on zeros of ``input_shape``
    (with the batch dimension, e.g. ``(1, 3, 32, 32)``).  Without either, both come from
    the loader's first batch: its shape for float tensors, else its first example (token
    ids keep their dtype; a dict batch loses ``"labels"``).
    """
    method = method if isinstance(method, Method) else get_method(method)
    check_arguments(
        ratio=ratio,
        target_params=target_params,
        target_flops=target_flops,
        rounds=rounds,
        per_layer_cap=per_layer_cap,
        fisher=fisher,
        fisher_batches=fisher_batches,
        fisher_samples=fisher_samples,
        damping=damping,
        eigenvalues=eigenvalues,
        seed=seed,
        start_round=start_round,
    )
    check_model(model)
    check_normalize(method, normalize)
    method.check_budget(one_budget(ratio, target_params, target_flops)[0])
    say = log or logger.warning
    roots = excluded_roots(model, exclude, classifier_name(model))
    note = tie_note(model, expand_excluded(model, roots))
    if note:
        say(note)
    if input_shape is not None and example_inputs is not None:
        raise ConfigError("run_pruning: give input_shape or example_inputs, not both")
    if input_shape is None and example_inputs is None:
        input_shape, example_inputs = infer_inputs(loader)
    before = reference or count_on(model, input_shape, example_inputs)
    current = copy.deepcopy(model)
    infos: list[RoundInfo] = []
    for r in range(start_round, rounds + 1):
        target = None
        if target_params is not None:
            target = Target("params", before.params * target_params ** (r / rounds))
        elif target_flops is not None:
            target = Target("flops", before.flops * target_flops ** (r / rounds))
        if (
            target is not None
            and getattr(count_on(current, input_shape, example_inputs), target.metric)
            <= target.count
        ):
            say(f"round {r}/{rounds}: already within its {target.metric} target; skipped")
            continue
        if before_round is not None:
            before_round(r)
        start = time.perf_counter()
        pruned, info = prune_round(
            current,
            loader,
            method=method,
            ratio=ratio,
            target=target,
            input_shape=input_shape,
            example_inputs=example_inputs,
            per_layer_cap=per_layer_cap,
            fisher=fisher,
            fisher_batches=fisher_batches,
            fisher_samples=fisher_samples,
            damping=damping,
            exclude=expand_excluded(current, roots),
            seed=seed + r - 1,
            device=device,
            eigenvalues=eigenvalues,
            normalize=normalize,
            log=_prefixed(log, f"round {r}/{rounds}: "),
        )
        if info.detail.removed_units == 0:
            if r == 1:
                budget = f"ratio {ratio:g}" if ratio is not None else "the round's target"
                eigen = method.units == "directions"
                raise nothing_removed(method.name, r, info.detail.total_units, eigen, budget)
            say(f"round {r} removed nothing: stopping after {r - 1} rounds")
            break
        current = pruned
        match_modes(current, model)
        info.round = r
        info.seconds["prune"] = time.perf_counter() - start
        if log:
            log(
                f"round {r}/{rounds}: {method.name} ratio {info.ratio:.3f} -> "
                f"{info.params:,} params, {info.flops:,} FLOPs"
            )
        if finetune is not None:
            start = time.perf_counter()
            with frozen_zeros(current, info.detail.take_masks()):
                finetune(current, r)
            info.seconds["finetune"] = time.perf_counter() - start
        infos.append(info)
        if on_round is not None:
            on_round(current, info)
    return PruneResult(current, before, count_on(current, input_shape, example_inputs), infos)


def prune_round(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str | Method,
    ratio: float | None,
    target: Target | tuple[Metric, float] | None,
    input_shape: tuple[int, ...] | None,
    per_layer_cap: float = 0.95,
    fisher: FisherType = "true",
    fisher_batches: int | None = None,
    fisher_samples: int = 1,
    damping: float | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    device: torch.device | str | None = None,
    eigenvalues: EigenvalueSource = "kfac",
    normalize: bool = False,
    log: Callable[[str], None] | None = None,
    example_inputs: Any = None,
) -> tuple[nn.Module, RoundInfo]:
    """One round of ``method`` on a copy of ``model``: :meth:`Method.round` with its
    :class:`RoundSpec` built from named settings, as :func:`run_pruning` runs each round.

    ``target`` is ``(metric, absolute count)``; ``exclude`` names every module never pruned
    (no block expansion, no output layer added); ``damping=None`` is the method's default.
    The settings are not checked beyond what the method checks itself.  ``log`` takes a
    line as each stage of the round starts and ends (None: quiet).  ``example_inputs``
    (what the model takes) replaces zeros of ``input_shape`` for counting and tracing.
    """
    method = method if isinstance(method, Method) else get_method(method)
    spec = RoundSpec(
        ratio=ratio,
        target=None if target is None else Target(*target),
        input_shape=input_shape,
        per_layer_cap=per_layer_cap,
        fisher=fisher,
        fisher_batches=fisher_batches,
        fisher_samples=fisher_samples,
        damping=method.default_damping if damping is None else damping,
        exclude=frozenset(exclude),
        seed=seed,
        device=device,
        eigenvalues=eigenvalues,
        normalize=normalize,
        log=log,
        example_inputs=example_inputs,
    )
    return method.round(model, loader, spec)


def _prefixed(log: Callable[[str], None] | None, prefix: str) -> Callable[[str], None] | None:
    """``log`` with every line starting with ``prefix`` (None stays None: quiet)."""
    if log is None:
        return None
    return lambda message: log(prefix + message)


@contextmanager
def frozen_zeros(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Mask gradients of pruned weights so fine-tuning cannot regrow them (SGD's weight decay
    and momentum of a zero weight with zero gradient stay zero)."""
    handles = []
    if masks:
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            keep = mask.to(device=weight.device, dtype=weight.dtype)
            handles.append(weight.register_hook(lambda g, keep=keep: g * keep))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
