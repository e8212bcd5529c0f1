"""Training, fine-tuning, evaluation and BatchNorm recalibration.

Pruning quality is only as trustworthy as the training around it, so this package is small,
plain SGD (as in the EigenDamage paper) and reproducible:

* a fresh run calls :func:`~eigendamage.seeding.seed_everything` with ``seed``;
* at the start of epoch ``e`` the train loader's own ``torch.Generator`` (if it has one) is
  reseeded with ``seed * 1000 + e``, so the shuffle order of an epoch does not depend on how
  many epochs ran in this process;
* after every epoch the checkpoint stores model, optimizer, schedule, history and
  :func:`~eigendamage.seeding.rng_state`; a killed run resumed from it ends with bit-identical
  weights on CPU.

``loop`` holds the loop, ``evaluation`` evaluation and BN recalibration, ``checkpoint`` the
history and the epoch checkpoints, ``progress`` the protocol an application draws progress by.
"""

from ..errors import TrainingError
from .checkpoint import TrainHistory
from .evaluation import EvalResult, evaluate, recalibrate_bn
from .loop import SCHEDULES, lr_at, reseed_loader, train
from .progress import TrainProgress

__all__ = [
    "SCHEDULES",
    "EvalResult",
    "TrainHistory",
    "TrainProgress",
    "TrainingError",
    "evaluate",
    "lr_at",
    "recalibrate_bn",
    "reseed_loader",
    "train",
]
