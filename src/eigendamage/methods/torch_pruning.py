"""Torch-Pruning's importance criteria, run through Torch-Pruning's own pruner, as baselines.

Why: a comparison against a widely used library is only fair when that library ranks,
thresholds and cuts itself: ``tp.pruner.BasePruner`` (``MetaPruner``) with
``global_pruning=True`` does.  Ours is only what a matched comparison needs and TP lacks:
a params/FLOPs budget (bisection on TP's ``pruning_ratio``, each trial a fresh pruner on a
fresh copy), the output layer and ``exclude`` as ``ignored_layers``, ``per_layer_cap``,
ties broken by rank, and the Taylor/Hessian gradients (TP 1.6's
``HessianImportance.accumulate_grad`` keeps only the last example's).  Details and the
reasons: docs/method.md, "Torch-Pruning baselines".  :class:`TorchPruning` is the method,
:func:`tp_round` one round of it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError, unknown_name
from ..modelcall import call_model, eval_mode, logits_of
from ..structure.groups import trace_forward
from ..structure.ties import tied_layers
from .base import Method, RoundDetail, RoundInfo, RoundSpec, Target, batches_read, stage
from .budget import Scale, solve_budget
from .checks import count_on, example_input, match_modes
from .tp_gradients import DEFAULT_BATCHES, GRADIENT_METHODS, gradients

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


def _trial(
    model: nn.Module,
    method: str,
    ratio: float,
    *,
    example: Any,
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
            forward_fn=trace_forward,
            output_transform=logits_of,
            **fresh,
        )
        for group in pruner.step(interactive=True):
            channel_groups = max(1, pruner._get_channel_groups(group))
            removed += len(group[0].idxs) // channel_groups
            group.prune()
    return _Trial(work, ratio, removed, scores.raw)


@dataclass(kw_only=True)
class TPDetail(RoundDetail):
    """One round of a ``tp-*`` method: TP's units removed and how TP was run."""

    target_reached: float | None = None
    removed_units: int
    total_units: int
    removed: dict[str, int]
    tp_pruning_ratio: float
    global_pruning: bool
    importance: str
    torch_pruning: str
    batches: int | None = None  # Taylor/Hessian: batches of gradients


def tp_round(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str,
    ratio: float | None,
    target: Target | None,
    input_shape: tuple[int, ...] | None,
    per_layer_cap: float,
    exclude: Iterable[str],
    seed: int,
    device: torch.device | str | None = None,
    fisher_batches: int | None = None,
    global_pruning: bool = True,
    log: Callable[[str], None] | None = None,
    example_inputs: Any = None,
) -> tuple[nn.Module, RoundInfo]:
    """One round of a ``tp-*`` method on a copy of ``model`` (untouched).

    ``ratio``: TP's ``pruning_ratio`` (fraction of the scored channels removed, per layer
    when ``global_pruning=False``), clipped to what ``per_layer_cap`` allows; ``target``:
    ``(metric, absolute count)``.  ``fisher_batches`` is the number of batches for
    Taylor/Hessian gradients (default 10); the curvature settings of the other methods
    (``fisher``, ``fisher_samples``, ``damping``) do not apply.  ``log`` (None: quiet)
    takes a line as each stage starts and ends.  Tracing and counting run on
    ``example_inputs`` when given (a tensor, tuple or dict), else on zeros of ``input_shape``.
    """
    import torch_pruning as tp

    tp_importance(method)  # unknown names fail before any work
    seconds: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    batches = fisher_batches or DEFAULT_BATCHES
    if method in GRADIENT_METHODS:
        squared = method == "tp-hessian"
        with stage(log, "gradients", seconds, batches_read(loader, batches)):
            grads = gradients(model, loader, squared=squared, batches=batches, device=device)
    with stage(log, "search", seconds, "(Torch-Pruning pruners until the budget is met)"):
        example = example_input(model, input_shape, example_inputs)
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
            metric, goal = target

            def measure(r: float) -> tuple[float, _Trial]:
                t = replay(r)
                return getattr(count_on(t.model, input_shape, example_inputs), metric), t

            resolution = 0.5 / units if global_pruning else 1e-4
            result = solve_budget(
                measure,
                goal,
                Scale(hi, steps=40, resolution=resolution, accept_hi="within"),
                label=f"target {metric} {goal:,.0f}",
                unreachable=lambda left: (
                    f"target {metric} {goal:,.0f} is unreachable for {method}: removing as many "
                    f"channels as per_layer_cap={per_layer_cap:g} allows leaves {left:,.0f}; "
                    "raise per_layer_cap or use more rounds"
                ),
            ).made
    pruned = _finish(result.model, model, example)
    counts = count_on(pruned, input_shape, example_inputs)
    detail = TPDetail(
        target_reached=getattr(counts, target[0]) / target[1] if target else None,
        removed_units=result.removed,
        total_units=units,
        removed=_removed_per_layer(model, pruned),
        tp_pruning_ratio=result.ratio,
        global_pruning=global_pruning,
        importance=type(tp_importance(method)).__name__,
        torch_pruning=tp.__version__,
        batches=batches if method in GRADIENT_METHODS else None,
    )
    achieved = result.removed / units
    return pruned, RoundInfo(0, achieved, counts.params, counts.flops, seconds, detail)


def _finish(pruned: nn.Module, source: nn.Module, example: Any) -> nn.Module:
    """Drop the gradients TP carried along, restore the source's ``requires_grad`` and
    train/eval flags, and check the pruned model still runs, with the source's output shape."""
    flags = {n: p.requires_grad for n, p in source.named_parameters()}
    for name, p in pruned.named_parameters():
        p.grad = None
        p.requires_grad_(flags.get(name, True))
    match_modes(pruned, source)
    with torch.no_grad(), eval_mode(pruned), eval_mode(source):
        before = call_model(source, example)
        try:
            after = call_model(pruned, example)
        except RuntimeError as e:
            raise ModelError(
                f"Torch-Pruning left {type(source).__name__} unable to run ({e}): its pruner "
                "cut layers whose sizes the forward relies on (e.g. attention heads); pass "
                "those blocks in exclude=, or use a channel method such as l1 or eigendamage"
            ) from e
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


class TorchPruning(Method):
    """A Torch-Pruning importance criterion run through TP's own pruner (see the module
    docstring); ``ratio`` is TP's ``pruning_ratio``."""

    units = "channels"

    def __init__(self, name: str, *, global_pruning: bool = True) -> None:
        if name not in TP_METHODS:
            raise ConfigError(unknown_name("Torch-Pruning method", name, TP_METHODS))
        self.name = name
        self.description = TP_METHODS[name][2]
        self.global_pruning = global_pruning

    def round(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """One TP round (:func:`tp_round`)."""
        return tp_round(
            model,
            loader,
            method=self.name,
            ratio=spec.ratio,
            target=spec.target,
            input_shape=spec.input_shape,
            per_layer_cap=spec.per_layer_cap,
            exclude=spec.exclude,
            seed=spec.seed,
            device=spec.device,
            fisher_batches=spec.fisher_batches,
            global_pruning=self.global_pruning,
            log=spec.log,
            example_inputs=spec.example_inputs,
        )
