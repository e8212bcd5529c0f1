"""eigendamage: Hessian-aware structured pruning in the Kronecker-factored eigenbasis.

Public API (re-exports only)::

    import eigendamage as ed
    factors = ed.collect_kfac(model, loader, fisher="true", batches=100)
    pruned = ed.prune(model, loader, method="eigendamage", ratio=0.6)
    stats = ed.count(pruned, input_shape=(1, 3, 32, 32))
"""

from .curvature import KFE, KFactors, collect_kfac, eigendecompose
from .data import make_loaders
from .errors import EigenDamageError
from .io import load_model, save_model
from .io import load_or_create as create_model  # a model name or a saved directory
from .measure import count, measure_latency
from .methods import PruneResult, available_methods, prune, run_pruning
from .models import list_models
from .surgery import KFEBottleneck, to_eigenbasis

__version__ = "0.1.0"

__all__ = [
    "KFE",
    "EigenDamageError",
    "KFEBottleneck",
    "KFactors",
    "PruneResult",
    "available_methods",
    "collect_kfac",
    "count",
    "create_model",
    "eigendecompose",
    "list_models",
    "load_model",
    "make_loaders",
    "measure_latency",
    "prune",
    "run_pruning",
    "save_model",
    "to_eigenbasis",
]
