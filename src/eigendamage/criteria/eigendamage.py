"""EigenDamage: prune eigen-directions of the Kronecker-factored eigenbasis.

In the KFE the K-FAC Fisher of a layer is diagonal, ``F' = diag(lam_S) (x) diag(lam_A)``
(or the EKFAC re-estimate), so OBD and OBS coincide: removing the core weight
``W'[o, i, k]`` costs ``Delta L = W'[o,i,k]^2 F'[o,i(,k)] / 2``.  Removing a whole input
eigen-direction ``i`` costs the sum over ``o, k``; an output direction ``o`` the sum over
``i, k``.  All directions of all layers are ranked together by ``Delta L`` and the lowest
fraction ``ratio`` is removed (a per-layer cap keeps at least ``1 - cap`` of each side).

Which layers are targets (:func:`target_policy`): every ``nn.Linear``/``nn.Conv2d`` (and
bottleneck core) except the excluded ones and those left dense because rewriting them
would not be exact or not be affordable -- each skip comes with its reason:

* grouped/depthwise convs (their eigenbasis would need a dense core, larger than the layer);
* layers inside ``nn.MultiheadAttention``, whose projections are used as bare weights by
  ``F.multi_head_attention_forward`` (torchvision ViT): never called as modules;
* layers the forward pass never calls as modules (torchvision Swin passes ``qkv.weight`` to
  a function; training-only auxiliary heads of GoogLeNet/Inception), found by one probe
  forward in eval mode on ``example_inputs`` or, by default, the model's spec input;
* weight sharing: a module reachable under two names, or whose parameters are also
  registered on another module (tied embeddings/heads): replacing it at one path would
  untie it.  A module *called* several times in one forward is supported: its K-FAC factors
  sum over calls (extra locations, as for tokens) and the one replaced object serves every
  call;
* subclasses that override ``forward`` (timm ``Conv2dSame``/``StdConv2d``: dynamic padding,
  weight standardisation): the surgery rebuilds plain layers and would drop that behaviour
  (timm's ``Linear``, a plain ``F.linear``, is allowed);
* layers with a side wider than ``max_side`` (VGG's 25088-input Linear): the ``O(d^3)``
  eigendecomposition of a ``d x d`` factor would dominate the whole run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..curvature.factors import KFE
from ..layers import is_plain_layer
from ..modelcall import call_model, eval_mode, model_device, to_device
from ..surgery.eigenbasis import (
    Factored,
    Form,
    KFEBottleneck,
    build_form,
    cheapest_form,
    form_params,
    in_eigenbasis,
    keep_directions,
    layer_path,
    set_submodule,
    to_factored,
)
from .amounts import check_fraction


@dataclass
class LayerScores:
    """Delta L of every input (columns) and output (rows) eigen-direction of one core."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    per_weight: torch.Tensor | None = None  # (d_out, d_in): the removed loss, exactly


@dataclass
class LayerPlan:
    """Which eigen-directions of one layer survive, and the form it will be built in."""

    keep_in: torch.Tensor
    keep_out: torch.Tensor
    form: Form = "full"
    params_before: int = 0
    params_after: int = 0


@dataclass
class EigenDamagePlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    threshold: float = 0.0
    pruned_directions: int = 0
    total_directions: int = 0
    predicted_delta_loss: float = 0.0  # sum of Delta L of every core weight removed


def rotated_layers(model: nn.Module, kfe: dict[str, KFE]) -> dict[str, Factored]:
    """Every target layer (keyed by its core's name) expressed in its new eigenbasis."""
    return {
        name: in_eigenbasis(to_factored(model.get_submodule(layer_path(name, model))), basis)
        for name, basis in kfe.items()
    }


def direction_scores(rotated: Factored, basis: KFE) -> LayerScores:
    """``Delta L`` per input and output eigen-direction of one rotated layer."""
    fisher = basis.diag.double()
    if fisher.dim() == 2:
        fisher = fisher.unsqueeze(-1)
    damage = 0.5 * rotated.core.square() * fisher  # (d_out, d_in, K)
    per_weight = damage.sum(-1)
    return LayerScores(inputs=per_weight.sum(0), outputs=per_weight.sum(1), per_weight=per_weight)


def plan_pruning(
    rotated: dict[str, Factored],
    scores: dict[str, LayerScores],
    *,
    ratio: float,
    per_layer_cap: float = 0.95,
) -> EigenDamagePlan:
    """One global threshold over all directions of all layers, then per-layer caps.

    ``ratio`` is the fraction of all eigen-directions (inputs and outputs of every layer)
    removed, as in the paper; ``per_layer_cap`` is the largest fraction removed from one
    side of one layer; the best-scoring direction of each side always survives.
    """
    check_fraction("ratio", ratio, open_low=False, open_high=True)
    check_fraction("per_layer_cap", per_layer_cap, open_low=True, open_high=False)
    everything = torch.cat([torch.cat([s.inputs, s.outputs]) for s in scores.values()])
    total = everything.numel()
    n_prune = int(math.floor(ratio * total))
    threshold = float(torch.sort(everything).values[n_prune - 1]) if n_prune > 0 else -math.inf
    plan = EigenDamagePlan(threshold=threshold, total_directions=total)
    # Ties at the threshold: rank positions, not values, decide (exact count).
    order = torch.argsort(everything, stable=True)
    pruned_mask = torch.zeros(total, dtype=torch.bool)
    pruned_mask[order[:n_prune]] = True
    offset = 0
    for name, s in scores.items():
        sides = []
        for side in (s.inputs, s.outputs):
            mask = pruned_mask[offset : offset + side.numel()]
            offset += side.numel()
            sides.append(keep_indices(side, mask, per_layer_cap))
        f = rotated[name]
        kept = keep_directions(f, sides[0], sides[1])
        dense = form_params(f, "dense")
        form = cheapest_form(kept, dense)
        if form == "dense":  # no pruned form is smaller: leave this layer unpruned
            sides = [torch.arange(s.inputs.numel()), torch.arange(s.outputs.numel())]
            kept = f
            current = form_params(f, "dense")
        else:
            current = form_params(kept, form)
            if s.per_weight is not None:  # rows and columns overlap: count each weight once
                kept_loss = s.per_weight[sides[1]][:, sides[0]].sum()
                plan.predicted_delta_loss += float(s.per_weight.sum() - kept_loss)
        plan.layers[name] = LayerPlan(sides[0], sides[1], form, dense, current)
        plan.pruned_directions += (
            s.inputs.numel() - sides[0].numel() + s.outputs.numel() - sides[1].numel()
        )
    return plan


def keep_indices(scores: torch.Tensor, pruned: torch.Tensor, cap: float) -> torch.Tensor:
    """Indices that survive on one side, honouring the cap and keeping >= 1 direction."""
    size = scores.numel()
    max_pruned = min(int(math.floor(cap * size)), size - 1)
    if int(pruned.sum()) > max_pruned:
        keep_count = size - max_pruned
        keep = torch.argsort(scores, descending=True, stable=True)[:keep_count]
        return torch.sort(keep).values
    return torch.nonzero(~pruned).flatten()


def apply_plan(model: nn.Module, rotated: dict[str, Factored], plan: EigenDamagePlan) -> nn.Module:
    """Replace every planned layer of ``model`` (in place) by its pruned, rebuilt form."""
    for name, lp in plan.layers.items():
        path = layer_path(name, model)
        f = rotated[name]
        if lp.form == "dense":
            # Unpruned this round: keep the layer as it is (a bottleneck stays one).
            continue
        set_submodule(model, path, build_form(keep_directions(f, lp.keep_in, lp.keep_out), lp.form))
    return model


MAX_SIDE = 8192


def eigendamage_targets(
    model: nn.Module,
    exclude: set[str],
    *,
    example_inputs: Any = None,
    max_side: int = MAX_SIDE,
) -> list[str]:
    """Names of the layers EigenDamage works on (see :func:`target_policy`)."""
    return target_policy(model, exclude, example_inputs=example_inputs, max_side=max_side)[0]


def target_policy(
    model: nn.Module,
    exclude: Iterable[str],
    *,
    example_inputs: Any = None,
    max_side: int = MAX_SIDE,
) -> tuple[list[str], dict[str, str]]:
    """``(targets, {layer left dense: reason})`` under the policy of the module docstring.

    Targets are plain Linear/Conv2d layers and the cores of existing bottlenecks, minus
    ``exclude`` and all modules inside an excluded one (excluded layers are not listed
    among the skipped).  The probe forward runs on ``example_inputs`` when given, else on
    the input of the model's ``eigendamage_spec`` (models from ``create_model``); other
    models are not probed.
    """
    exclude = set(exclude)
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        names_of[id(module)].append(name)
    owners: dict[int, set[str]] = defaultdict(set)
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].add(pname.rpartition(".")[0])
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    targets: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if _under(name, exclude):
            continue
        if isinstance(module, KFEBottleneck):
            targets.append(f"{name}.core")
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or _inside_bottleneck(model, name):
            continue
        reason = _static_reason(module, name, names_of, owners, inside_mha, max_side)
        if reason:
            skipped[name] = reason
        else:
            targets.append(name)
    calls = None
    if example_inputs is not None and targets:
        calls = _probe_calls(model, targets, example_inputs)
    elif isinstance(getattr(model, "eigendamage_spec", None), dict) and targets:
        from ..models.registry import example_input

        try:
            calls = _probe_calls(model, targets, example_input(model))
        except Exception:  # a model altered after create_model: no probe, static rules only
            calls = None
    if calls is not None:
        for name in list(targets):
            if calls[name]:
                continue
            reason = "never called as a module in the forward pass (eval mode)"
            targets.remove(name)
            skipped[name] = reason
    return targets, skipped


def _under(name: str, exclude: set[str]) -> bool:
    """``name`` or one of its ancestors is excluded (excluding a block excludes its layers)."""
    while name:
        if name in exclude:
            return True
        name = name.rpartition(".")[0]
    return False


def _static_reason(
    module: nn.Module,
    name: str,
    names_of: dict[int, list[str]],
    owners: dict[int, set[str]],
    inside_mha: set[str],
    max_side: int,
) -> str | None:
    """Why ``module`` (a Linear/Conv2d at ``name``) is left dense, or None."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped conv (groups={module.groups})"
    if name in inside_mha:
        return "inside nn.MultiheadAttention (weights used functionally)"
    aliases = [n for n in names_of[id(module)] if n != name]
    if aliases:
        return f"shared module, also at {aliases[0]!r}"
    for param in module.parameters(recurse=False):
        others = sorted(owners[id(param)] - set(names_of[id(module)]))
        if others:
            return f"tied parameter, also in {others[0]!r}"
    if not is_plain_layer(module):
        return f"{type(module).__name__} overrides forward"
    sides = (
        (module.in_features, module.out_features)
        if isinstance(module, nn.Linear)
        else (module.in_channels, module.out_channels)
    )
    if max(sides) > max_side:
        return f"too wide for the eigendecomposition ({max(sides)} > max_side={max_side})"
    return None


def _probe_calls(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, int]:
    """How often each named module is called in one eval-mode forward."""
    calls = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            calls[name] += 1

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, to_device(example_inputs, model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return calls


def _inside_bottleneck(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), KFEBottleneck)


def classifier_name(model: nn.Module) -> str | None:
    """The last Linear/Conv2d (or bottleneck) in module order: the logits layer."""
    last = None
    for name, module in model.named_modules():
        is_layer = isinstance(module, (nn.Linear, nn.Conv2d))
        if isinstance(module, KFEBottleneck) or (is_layer and not _inside_bottleneck(model, name)):
            last = name
    return last
