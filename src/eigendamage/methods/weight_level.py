"""Weight-level OBD / OBS under K-FAC as methods: unstructured sparsity, the paper's weight
baselines (the scores and updates live in :mod:`eigendamage.criteria.weight_level`).

They zero weights and keep every shape, so the dense counts do not change: they take a
``ratio`` only, of the weights still standing (as channel methods take it of the channels
left), and report the parameters left non-zero.  Fine-tuning keeps the zeros: the loop
masks the pruned weights' gradients with the masks the round hands over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..criteria.amounts import BudgetKind
from ..criteria.base import collect_factors
from ..criteria.eigendamage import classifier_name
from ..criteria.weight_level import weight_prune
from ..errors import ConfigError, ModelError
from ..layers import is_plain_layer
from ..measure import count
from ..structure.ties import tied_layers
from .base import DampedMethod, RoundDetail, RoundInfo, RoundSpec
from .checks import is_plain_conv_or_linear, no_plain_layer

WEIGHT_NOTES = {
    "obd": "weights: OBD under K-FAC (zeroed, shapes kept)",
    "obs": "weights: OBS under K-FAC with update (zeroed, shapes kept)",
}


@dataclass(kw_only=True)
class WeightDetail(RoundDetail):
    """One round of obd/obs: the sparsity reached and the weights left non-zero."""

    internal: ClassVar[frozenset[str]] = frozenset({"masks"})

    sparsity: float
    threshold: float
    masks: dict[str, torch.Tensor] | None  # True where a weight is kept; for fine-tuning
    per_layer_sparsity: dict[str, float]
    removed_units: int
    total_units: int
    params_nonzero: int

    def take_masks(self) -> dict[str, torch.Tensor] | None:
        """The masks, handed over once (they are not part of the report)."""
        masks, self.masks = self.masks, None
        return masks


class WeightLevel(DampedMethod):
    """``obd`` or ``obs``: the ``ratio`` fraction of the standing weights with the lowest
    ``Delta L`` zeroed (one global threshold, capped per layer)."""

    units = "weights"
    budgets = ("ratio",)

    def __init__(self, name: str) -> None:
        self.name = name
        self.description = WEIGHT_NOTES.get(name, "")

    def check(
        self, model: nn.Module, input_shape: tuple[int, ...] | None, example_inputs: Any = None
    ) -> None:
        """Some Linear/Conv2d layer besides the output layer."""
        output = classifier_name(model)
        if not any(is_plain_conv_or_linear(m) and n != output for n, m in model.named_modules()):
            raise no_plain_layer(model, self.name, output)

    def check_budget(self, budget: BudgetKind) -> None:
        """A ratio only: the dense counts do not change, so no budget can be met."""
        if budget != "ratio":
            raise ConfigError(f"{self.name} is weight-level: give a ratio (sparsity), not a budget")

    def round_at(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """Zero the round's share of the standing weights (see :class:`WeightLevel`)."""
        example = spec.example(model)
        seconds: dict[str, float] = {}
        layers = self._layers(model, spec.exclude)
        weights = [model.get_submodule(n).weight for n in layers]
        zeros = sum(int((w == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        # ratio of the weights still standing, as channel methods take it of the channels left
        sparsity = zeros / total + spec.ratio * (1 - zeros / total)
        with spec.stage("curvature", seconds, spec.batches(loader)):
            factors = collect_factors(model, loader, spec.data_pass(), layers, needed_by=self.name)
        with spec.stage("weight_prune", seconds, f"to sparsity {sparsity:.3f}"):
            pruned, info = weight_prune(
                model, None, self.name, sparsity, factors=factors, modules=layers,
                per_layer_cap=spec.per_layer_cap, damping=spec.damping,
            )  # fmt: skip
        counts = count(pruned, example_inputs=example)
        masks = info["masks"]
        zeroed = sum(int((pruned.get_submodule(n).weight == 0).sum()) for n in layers)
        detail = WeightDetail(
            sparsity=info["sparsity"],
            threshold=info["threshold"],
            masks=masks,
            per_layer_sparsity=info["per_layer_sparsity"],
            # newly zeroed: old zeros stay masked anyway
            removed_units=sum(
                int(((w != 0).cpu() & ~masks[n]).sum())
                for n, w in zip(layers, weights, strict=True)
            ),
            total_units=total - zeros,
            params_nonzero=counts.params - zeroed,  # masked now or in an earlier round
        )
        return pruned, RoundInfo(0, info["sparsity"], counts.params, counts.flops, seconds, detail)

    def _layers(self, model: nn.Module, exclude: Iterable[str]) -> list[str]:
        """The layers to zero weights of; tied layers stay dense (their tie survives)."""
        tied = tied_layers(model)
        plain = [n for n, m in model.named_modules() if is_plain_layer(m)]
        layers = [n for n in plain if n not in exclude and n not in tied]
        if not layers:
            raise ModelError(
                f"no layer {self.name} can prune in {type(model).__name__}: it prunes "
                f"nn.Linear and nn.Conv2d layers; found {plain or 'none'}, excluded "
                f"{sorted(set(exclude) & set(plain)) or 'none'}, tied {sorted(tied) or 'none'}"
            )
        return layers
