"""Torch-Pruning's importance criteria, run through Torch-Pruning's own pruner, as baselines.

Why: a comparison against a widely used library is only fair when that library ranks,
thresholds and cuts itself: ``tp.pruner.BasePruner`` (``MetaPruner``) with
``global_pruning=True`` does.  Ours is only what a matched comparison needs and TP lacks:
a params/FLOPs budget (bisection on TP's ``pruning_ratio``, each trial a fresh pruner on a
fresh copy), the output layer and ``exclude`` as ``ignored_layers``, ``per_layer_cap``,
ties broken by rank, and the Taylor/Hessian gradients (TP 1.6's
``HessianImportance.accumulate_grad`` keeps only the last example's).  Details and the
reasons: docs/method.md, "Torch-Pruning baselines".  :func:`tp_round` is one round of
``pruner.run_pruning``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .curvature.hooks import (
    IGNORE_INDEX,
    _split_batch,
    call_model,
    check_labels,
    eval_mode,
    logits_of,
    model_device,
    to_device,
)
from .errors import ConfigError, CurvatureError, ModelError, unknown_name
from .measure import count
from .prune_checks import match_modes
from .structure.ties import tied_layers

if TYPE_CHECKING:
    from .pruner import RoundInfo

GRADIENT_METHODS = ("tp-taylor", "tp-hessian")
DEFAULT_BATCHES = 10  # TP's examples accumulate gradients over a few (10) training batches
logger = logging.getLogger("eigendamage")


# name: (TP importance class, its arguments, the note `eigendamage methods` prints)
TP_METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "tp-bn-scale": ("BNScaleImportance", {}, "Torch-Pruning: |BatchNorm gamma| in the group"),
    "tp-hessian": ("HessianImportance", {}, "Torch-Pruning: OBD, w^2 * mean squared gradient"),
    "tp-l1": ("MagnitudeImportance", {"p": 1}, "Torch-Pruning: group L1 norm"),
    "tp-l2": ("MagnitudeImportance", {"p": 2}, "Torch-Pruning: group squared L2 norm"),
    "tp-lamp": ("LAMPImportance", {"p": 2}, "Torch-Pruning: LAMP-normalised squared L2"),
    "tp-random": ("RandomImportance", {}, "Torch-Pruning: seeded random scores"),
    "tp-taylor": ("TaylorImportance", {}, "Torch-Pruning: first-order Taylor |w * grad|"),
}


def tp_importance(method: str) -> Any:
    """A fresh TP importance object for ``method`` (TP's defaults: group mean reduction,
    mean normalisation; LAMP its own normaliser)."""
    if method not in TP_METHODS:
        raise ConfigError(unknown_name("Torch-Pruning method", method, TP_METHODS))
    import torch_pruning as tp

    cls, kwargs, _ = TP_METHODS[method]
    return getattr(tp.importance, cls)(**kwargs)


class _Scores:
    """TP's importance as the pruner sees it.  Probe (``fixed=None``): call TP's criterion
    and record its scores per group root.  Replay: return the recorded scores as ranks
    (see :func:`_ranked`), the same in every trial of the budget search."""

    def __init__(self, inner: Any, names: dict[nn.Module, str], fixed: dict | None) -> None:
        self.inner, self.names, self.fixed = inner, names, fixed
        self.raw: dict[str, torch.Tensor] = {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        name = self.names[group[0].dep.target.module]
        if self.fixed is not None:
            return self.fixed[name].clone() if name in self.fixed else None
        imp = self.inner(group)
        if imp is None:  # e.g. BN-scale on a group without BatchNorm: TP leaves it alone
            return None
        # A group of all-zero scores (dead channels) is normalised 0/0 = NaN by TP, which
        # its threshold never selects; they are the least important, so 0.
        self.raw[name] = torch.nan_to_num(imp.detach().double().cpu(), nan=0.0)
        return self.raw[name]


def _ranked(
    raw: dict[str, torch.Tensor], cap: float
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Scores replaced by their rank among all scored channels (ties by group, then channel
    order), and each group's best ``n - floor(cap * n)`` channels (>= 1) made unprunable
    (+inf); also ``(channels, removable)`` per group.  Why ranks: TP removes *all* channels
    tied at its threshold at once (an untrained net's BN scales), missing most budgets."""
    names = list(raw)
    flat = torch.cat([raw[n] for n in names])
    ranks = torch.empty_like(flat)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(1, len(flat) + 1, dtype=flat.dtype)
    out, sizes = {}, []
    for name, part in zip(names, ranks.split([len(raw[n]) for n in names]), strict=True):
        n = len(part)
        removable = min(math.floor(cap * n), n - 1)
        part = part.clone()
        part[part.topk(n - removable).indices] = math.inf
        out[name] = part
        sizes.append((n, removable))
    return out, sizes


@dataclass
class _Trial:
    model: nn.Module
    ratio: float  # TP's pruning_ratio
    removed: int  # channels (TP's units) removed
    raw: dict[str, torch.Tensor] = field(default_factory=dict)


def _gradients(
    model: nn.Module, loader: Iterable, *, squared: bool, batches: int, device: Any
) -> dict[str, torch.Tensor]:
    """Per-parameter gradients of the cross-entropy on the first ``batches`` batches, in
    eval mode (BN statistics untouched): summed batch-mean gradients (Taylor, as TP's
    ``loss.backward()`` per batch), or the mean over examples of squared per-example
    gradients (Hessian, the diagonal empirical Fisher of OBD)."""
    dev = torch.device(device) if device is not None else model_device(model)
    work = copy.deepcopy(model).to(dev)
    params = dict(work.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    examples = 0

    def add(loss: torch.Tensor, power: int) -> None:
        if not torch.isfinite(loss):
            raise CurvatureError(f"non-finite loss ({loss.item()}): check inputs and model")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                sums[name] += g.pow(power)

    with eval_mode(work), torch.enable_grad():
        for step, batch in enumerate(loader):
            if step >= batches:
                break
            inputs, labels = _split_batch(batch, step)
            inputs, labels = to_device(inputs, dev), to_device(labels, dev)
            # Hessian: one forward per example (exact in eval mode), Taylor: the batch
            for i in range(len(labels)) if squared else [None]:
                x, y = (inputs, labels) if i is None else (_take(inputs, i), labels[i : i + 1])
                add(_loss(work, x, y, step), 2 if squared else 1)
                examples += 1
    if examples == 0:
        raise ConfigError("the loader yielded no batch: Taylor/Hessian need training data")
    scale, home = (1.0 / examples if squared else 1.0), model_device(model)
    return {n: (s * scale).to(home) for n, s in sums.items()}


def _loss(model: nn.Module, inputs: Any, labels: torch.Tensor, step: int) -> torch.Tensor:
    logits = call_model(model, inputs)
    check_labels(labels, logits.shape[-1], f"batch {step} of the loader")
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _take(inputs: Any, i: int) -> Any:
    """Example ``i`` of a batch's inputs (a tensor, a tuple of them or a dict), kept batched."""
    if isinstance(inputs, torch.Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, dict):
        return {k: _take(v, i) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_take(v, i) for v in inputs)
    return inputs


def _trial(
    model: nn.Module,
    method: str,
    ratio: float,
    *,
    example: torch.Tensor,
    ignored: list[str],
    global_pruning: bool,
    grads: dict[str, torch.Tensor] | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> _Trial:
    """One TP pruner on a fresh copy of ``model``, one ``step()`` at ``pruning_ratio=ratio``:
    the probe (``fixed=None``, ratio 0: TP's criterion scores, nothing is removed) or a
    replay of the probe's ranked scores."""
    import torch_pruning as tp

    from .structure.groups import _trace_forward

    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    for name, g in (grads or {}).items():
        params[name].grad = g
    if method in GRADIENT_METHODS and fixed is None:  # TP reads every layer's .grad
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    modules = dict(work.named_modules())
    names = {m: n for n, m in modules.items()}
    scores = _Scores(tp_importance(method), names, fixed)
    removed = 0
    # TP's defaults for these are shared mutable dicts that collect every traced module
    fresh: dict[str, dict] = dict(in_channel_groups={}, out_channel_groups={}, num_heads={})
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)  # tp-random draws its scores from torch's generator
        pruner = tp.pruner.BasePruner(
            work,
            example,
            importance=scores,
            global_pruning=global_pruning,
            pruning_ratio=ratio,
            ignored_layers=[modules[n] for n in ignored],
            forward_fn=_trace_forward,
            output_transform=logits_of,
            **fresh,
        )
        for group in pruner.step(interactive=True):
            channel_groups = max(1, pruner._get_channel_groups(group))
            removed += len(group[0].idxs) // channel_groups
            group.prune()
    return _Trial(work, ratio, removed, scores.raw)


def _solve(
    trial: Callable[[float], _Trial],
    target: tuple[str, float],
    input_shape: tuple[int, ...],
    hi: float,
    resolution: float,
    *,
    method: str,
    cap: float,
    tolerance: float = 0.01,
    steps: int = 40,
) -> _Trial:
    """Bisection on TP's ratio in ``[0, hi]``: within ``tolerance``, else the nearest under."""
    metric, goal = target

    def run(r: float) -> tuple[float, _Trial]:
        t = trial(r)
        return getattr(count(t.model, input_shape), metric), t

    value, at_hi = run(hi)
    if value > goal * (1 + tolerance):
        raise ConfigError(
            f"target {metric} {goal:,.0f} is unreachable for {method}: removing as many "
            f"channels as per_layer_cap={cap:g} allows leaves {value:,.0f}; raise "
            "per_layer_cap or use more rounds"
        )
    if abs(value - goal) <= tolerance * goal:
        return at_hi
    under = (value, at_hi)  # the largest count at or below the goal seen so far
    lo = 0.0
    for _ in range(steps):
        if hi - lo <= resolution:
            break
        mid = 0.5 * (lo + hi)
        value, t = run(mid)
        if abs(value - goal) <= tolerance * goal:
            return t
        if value > goal:
            lo = mid
        else:
            hi = mid
            if value > under[0]:
                under = (value, t)
    logger.warning(
        f"target {metric} {goal:,.0f} cannot be met within {tolerance:.0%}; took the "
        f"nearest model under it, {under[0]:,.0f} ({under[0] / goal:.3f} of the target)"
    )
    return under[1]


def tp_round(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str,
    ratio: float | None,
    target: tuple[str, float] | None,
    input_shape: tuple[int, ...],
    per_layer_cap: float,
    exclude: set[str],
    seed: int,
    device: torch.device | str | None = None,
    fisher_batches: int | None = None,
    global_pruning: bool = True,
    **_: object,
) -> tuple[nn.Module, RoundInfo]:
    """One round of a ``tp-*`` method on a copy of ``model`` (untouched).

    ``ratio``: TP's ``pruning_ratio`` (fraction of the scored channels removed, per layer
    when ``global_pruning=False``), clipped to what ``per_layer_cap`` allows; ``target``:
    ``("params" | "flops", absolute count)``.  ``fisher_batches`` is the number of batches
    for Taylor/Hessian gradients (default 10); the curvature settings of the other methods
    (``fisher``, ``fisher_samples``, ``damping``) do not apply and are ignored.
    """
    import torch_pruning as tp

    from .pruner import RoundInfo

    tp_importance(method)  # unknown names fail before any work
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    grads: dict[str, torch.Tensor] = {}
    batches = fisher_batches or DEFAULT_BATCHES
    if method in GRADIENT_METHODS:
        squared = method == "tp-hessian"
        grads = _gradients(model, loader, squared=squared, batches=batches, device=device)
        seconds["gradients"] = time.perf_counter() - start
        start = time.perf_counter()
    ref = next(model.parameters())
    example = torch.zeros(input_shape, device=ref.device, dtype=ref.dtype)
    ignored = sorted(set(exclude) | set(tied_layers(model)))

    trial = partial(
        _trial, model, method, example=example, ignored=ignored,
        global_pruning=global_pruning, seed=seed,
    )  # fmt: skip
    raw = trial(0.0, grads=grads).raw  # the probe: TP's scores, nothing removed
    if not raw:
        raise ModelError(
            f"{method} scores no channel group of {type(model).__name__} (output and "
            f"excluded layers: {', '.join(ignored) or 'none'})"
            + ("; it needs BatchNorm layers" if method == "tp-bn-scale" else "")
        )
    fixed, sizes = _ranked(raw, per_layer_cap)
    del grads
    units = sum(n for n, _ in sizes)
    # TP removes N - int(N * (1 - r)) of N channels per scope: at most the removable ones
    if global_pruning:
        hi = (sum(m for _, m in sizes) - 0.5) / units
    else:
        hi = min((m - 0.5) / n for n, m in sizes)
    hi = max(hi, 0.0)
    replay = partial(trial, fixed=fixed)
    if target is None:
        result = replay(min(float(ratio or 0.0), hi))
    else:
        resolution = 0.5 / units if global_pruning else 1e-4
        result = _solve(
            replay, target, input_shape, hi, resolution, method=method, cap=per_layer_cap
        )
    seconds["search"] = time.perf_counter() - start  # TP pruners until the budget is met
    pruned = _finish(result.model, model, example)
    counts = count(pruned, input_shape)
    detail = {
        **({"target_reached": getattr(counts, target[0]) / target[1]} if target else {}),
        "removed_units": result.removed,
        "total_units": units,
        "removed": _removed_per_layer(model, pruned),
        "tp_pruning_ratio": result.ratio,
        "global_pruning": global_pruning,
        "importance": type(tp_importance(method)).__name__,
        "torch_pruning": tp.__version__,
        **({"batches": batches} if method in GRADIENT_METHODS else {}),
    }
    achieved = result.removed / units
    return pruned, RoundInfo(0, achieved, counts.params, counts.flops, seconds, detail)


def _finish(pruned: nn.Module, source: nn.Module, example: torch.Tensor) -> nn.Module:
    """Drop the gradients TP carried along, restore the source's ``requires_grad`` and
    train/eval flags, and check the output still has the source's shape."""
    flags = {n: p.requires_grad for n, p in source.named_parameters()}
    for name, p in pruned.named_parameters():
        p.grad = None
        p.requires_grad_(flags.get(name, True))
    match_modes(pruned, source)
    with torch.no_grad(), eval_mode(pruned), eval_mode(source):
        before, after = logits_of(source(example)), logits_of(pruned(example))
    if before.shape != after.shape:
        raise ModelError(
            f"Torch-Pruning changed the output shape {tuple(before.shape)} -> "
            f"{tuple(after.shape)}: pass the output layer in exclude="
        )
    return pruned


def _removed_per_layer(source: nn.Module, pruned: nn.Module) -> dict[str, int]:
    """Output channels removed per Conv/Linear layer (layers that lost none left out)."""
    kinds = (nn.Conv2d, nn.Linear)
    after = {n: m.weight.shape[0] for n, m in pruned.named_modules() if isinstance(m, kinds)}
    sizes = {n: m.weight.shape[0] for n, m in source.named_modules() if isinstance(m, kinds)}
    return {n: k - after[n] for n, k in sizes.items() if n in after and k != after[n]}
