"""Pruning criteria: channel baselines (Hessian-based and not) and weight-level OBD/OBS.

Importing the modules registers their channel criteria in :data:`CRITERIA`.
"""

from . import channel_hessian, magnitude, slimming
from .base import CRITERIA, ChannelCriterion, GlobalRanking, ScoreContext, get_criterion, register
from .weight_level import WEIGHT_METHODS, weight_prune, weight_scores

__all__ = [
    "CRITERIA",
    "WEIGHT_METHODS",
    "ChannelCriterion",
    "GlobalRanking",
    "ScoreContext",
    "channel_hessian",
    "get_criterion",
    "magnitude",
    "register",
    "slimming",
    "weight_prune",
    "weight_scores",
]
