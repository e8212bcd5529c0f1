"""EigenDamage: prune eigen-directions of the Kronecker-factored eigenbasis.

In the KFE the K-FAC Fisher of a layer is diagonal, ``F' = diag(lam_S) (x) diag(lam_A)``
(or the EKFAC re-estimate), so OBD and OBS coincide: removing the core weight
``W'[o, i, k]`` costs ``Delta L = W'[o,i,k]^2 F'[o,i(,k)] / 2``.  Removing a whole input
eigen-direction ``i`` costs the sum over ``o, k``; an output direction ``o`` the sum over
``i, k``.  All directions of all layers are ranked together by ``Delta L`` and the lowest
fraction ``ratio`` is removed (a per-layer cap keeps at least ``1 - cap`` of each side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..curvature.factors import KFE
from ..errors import ConfigError
from ..surgery.eigenbasis import (
    Factored,
    KFEBottleneck,
    build,
    cheapest_form,
    factor,
    form_params,
    layer_path,
    rotate,
    select,
    set_submodule,
)


@dataclass
class LayerScores:
    """Delta L of every input (columns) and output (rows) eigen-direction of one core."""

    inputs: torch.Tensor
    outputs: torch.Tensor


@dataclass
class LayerPlan:
    """Which eigen-directions of one layer survive, and the form it will be built in."""

    keep_in: torch.Tensor
    keep_out: torch.Tensor
    form: str = "full"
    params_before: int = 0
    params_after: int = 0


@dataclass
class EigenDamagePlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    threshold: float = 0.0
    pruned_directions: int = 0
    total_directions: int = 0


def rotated_layers(model: nn.Module, kfe: dict[str, KFE]) -> dict[str, Factored]:
    """Every target layer (keyed by its core's name) expressed in its new eigenbasis."""
    return {
        name: rotate(factor(model.get_submodule(layer_path(name, model))), basis)
        for name, basis in kfe.items()
    }


def direction_scores(rotated: Factored, basis: KFE) -> LayerScores:
    """``Delta L`` per input and output eigen-direction of one rotated layer."""
    fisher = basis.diag.double()
    if fisher.dim() == 2:
        fisher = fisher.unsqueeze(-1)
    damage = 0.5 * rotated.core.square() * fisher  # (d_out, d_in, K)
    per_weight = damage.sum(-1)
    return LayerScores(inputs=per_weight.sum(0), outputs=per_weight.sum(1))


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
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio must be in [0, 1), got {ratio}")
    if not 0.0 < per_layer_cap <= 1.0:
        raise ConfigError(f"per_layer_cap must be in (0, 1], got {per_layer_cap}")
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
            sides.append(_keep_indices(side, mask, per_layer_cap))
        f = rotated[name]
        kept = select(f, sides[0], sides[1])
        dense = form_params(f, "dense")
        form = cheapest_form(kept, dense)
        if form == "dense":  # no pruned form is smaller: leave this layer unpruned
            sides = [torch.arange(s.inputs.numel()), torch.arange(s.outputs.numel())]
            kept = f
            current = form_params(f, "dense")
        else:
            current = form_params(kept, form)
        plan.layers[name] = LayerPlan(sides[0], sides[1], form, dense, current)
        plan.pruned_directions += (
            s.inputs.numel() - sides[0].numel() + s.outputs.numel() - sides[1].numel()
        )
    return plan


def _keep_indices(scores: torch.Tensor, pruned: torch.Tensor, cap: float) -> torch.Tensor:
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
        set_submodule(model, path, build(select(f, lp.keep_in, lp.keep_out), lp.form))
    return model


def eigendamage_targets(model: nn.Module, exclude: set[str]) -> list[str]:
    """Names of the layers EigenDamage works on: plain Linear/Conv2d (groups == 1) and
    the cores of existing bottlenecks, minus ``exclude`` (by default the classifier)."""
    names = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if name in exclude or (parent and parent in exclude):
            continue
        if isinstance(module, KFEBottleneck):
            names.append(f"{name}.core")
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not _inside_bottleneck(model, name):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue  # grouped/depthwise convs stay dense (see docs)
            names.append(name)
    return names


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
