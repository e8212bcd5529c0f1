"""Data-free channel criteria: filter L1 norm (Li et al., 2017) and a seeded random baseline.

Their scores only rank channels (they are not loss increases); a group's score is the sum
over its root layers, so a residual-stage channel counts the filters of every conv that
writes to it.

``l1`` ranks filters *within* each layer, as Li et al. do: every prunable layer (channel
group) loses the same fraction of its filters, its lowest-norm ones, the fraction set by
the ratio or budget.  A filter norm depends on the layer's fan-in and initialisation
scale, so norms of different layers are not comparable: the earlier global ranking of
them lost 27-63 points of accuracy to this one on digits-vgg (docs/method.md), so it was
dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ChannelCriterion, ScoreContext, register


class L1(ChannelCriterion):
    """``sum |weight|`` of each output filter (the bias is not part of the filter), ranked
    within each layer: every layer loses the same fraction (Li et al., 2017)."""

    name = "l1"
    ranking = "layer"

    def score(self, model: nn.Module, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        return {
            n: model.get_submodule(n).weight.detach().flatten(1).abs().sum(1).double()
            for n in ctx.layers
        }


class Random(ChannelCriterion):
    """Uniform random scores from a generator seeded with ``ctx.seed`` (reproducible)."""

    name = "random"

    def score(self, model: nn.Module, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(ctx.seed)
        return {
            n: torch.rand(
                model.get_submodule(n).weight.shape[0], generator=gen, dtype=torch.float64
            )
            for n in ctx.layers
        }


register(L1())
register(Random())
