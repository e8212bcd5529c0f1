"""Data-free channel criteria: filter L1 norm (Li et al., 2017) and a seeded random baseline.

Their scores only rank channels (they are not loss increases); a group's score is the sum
over its root layers, so a residual-stage channel counts the filters of every conv that
writes to it.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ChannelCriterion, ScoreContext, register


class L1(ChannelCriterion):
    """``sum |weight|`` of each output filter (the bias is not part of the filter)."""

    name = "l1"

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
