"""Network slimming (Liu et al., 2017): rank channels by ``|gamma|`` of their BatchNorm.

Meaningful for models trained with an L1 penalty on the BN scales (``train.py``'s
``l1_bn``), which drives unimportant channels' gamma towards 0.  Scores are keyed by the
BatchNorm layers of the prunable groups; a group whose members include no BatchNorm gets
no score and is not pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import ChannelCriterion, ScoreContext, register


class Slimming(ChannelCriterion):
    """``|gamma|`` of every BatchNorm in a prunable group (summed within a group)."""

    name = "slimming"
    needs = frozenset({"bn"})

    def score(self, model: nn.Module, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        out = {}
        for name in ctx.norm_layers:
            bn = model.get_submodule(name)
            if bn.weight is None:
                raise ConfigError(f"slimming: BatchNorm {name!r} has no affine weight (gamma)")
            out[name] = bn.weight.detach().abs().double()
        if not out:
            raise ConfigError(
                "slimming needs BatchNorm layers after the prunable convs; none found"
            )
        return out


register(Slimming())
