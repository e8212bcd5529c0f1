"""eigendamage: Hessian-aware structured pruning in the Kronecker-factored eigenbasis.

Public API (re-exports only)::

    import eigendamage as ed
    loaders = ed.make_loaders("digits")
    model = ed.create_model("digits-vgg")  # the same weights on every run (seed=0)
    ed.train_model(model, loaders.train, epochs=3, lr=0.05)
    factors = ed.collect_kfac(model, loaders.train, fisher="true", batches=20)
    pruned = ed.prune(model, loaders.train, method="eigendamage", ratio=0.5)
    print(ed.evaluate(pruned, loaders.test), ed.count(pruned))

Training is ``train_model`` here (``eigendamage.train.train``): a root attribute named
``train`` would hide the ``eigendamage.train`` subpackage.
"""

from .curvature import KFE, KFactors, collect_kfac, eigendecompose
from .data import make_loaders
from .errors import EigenDamageError
from .io import load_model, save_model
from .io import load_or_create as create_model  # a model name or a saved directory
from .measure import Counts, count, measure_latency
from .methods import PruneResult, available_methods, prune, run_pruning
from .models import list_models
from .surgery import KFEBottleneck, to_eigenbasis
from .train import EvalResult, evaluate
from .train import train as train_model

__version__ = "0.1.0"

__all__ = [
    "KFE",
    "Counts",
    "EigenDamageError",
    "EvalResult",
    "KFEBottleneck",
    "KFactors",
    "PruneResult",
    "available_methods",
    "collect_kfac",
    "count",
    "create_model",
    "eigendecompose",
    "evaluate",
    "list_models",
    "load_model",
    "make_loaders",
    "measure_latency",
    "prune",
    "run_pruning",
    "save_model",
    "to_eigenbasis",
    "train_model",
]
