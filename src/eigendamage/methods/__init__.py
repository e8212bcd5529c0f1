"""Pruning methods behind one contract, their registry, and the loop that runs them."""

from .base import Method, RoundDetail, RoundInfo, RoundSpec, Target
from .loop import PruneResult, prune, prune_round, run_pruning
from .registry import available_methods, check_normalize, get_method, register_method

__all__ = [
    "Method",
    "PruneResult",
    "RoundDetail",
    "RoundInfo",
    "RoundSpec",
    "Target",
    "available_methods",
    "check_normalize",
    "get_method",
    "prune",
    "prune_round",
    "register_method",
    "run_pruning",
]
