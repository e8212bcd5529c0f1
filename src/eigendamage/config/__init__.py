"""Validated run configurations (pydantic v2) loaded from JSON/TOML plus CLI overrides.

Why strict models (``extra="forbid"``, ranges on every number): a typo such as ``lrr = 0.1``
or a negative damping would otherwise silently run the wrong experiment for hours.  Every
validation problem becomes one :class:`~eigendamage.errors.ConfigError` line naming the file,
the dotted field and the reason.

``schemas`` holds the models, ``loading`` reading files, overrides and the error lines.
"""

from .loading import (
    build_config,
    config_to_dict,
    format_validation_error,
    load_config,
    merge_overrides,
)
from .schemas import (
    NORM_SUFFIX,
    PICKLE_IN_FILE,
    CompareConfig,
    FineTuneConfig,
    PruneConfig,
    TrainConfig,
)

__all__ = [
    "NORM_SUFFIX",
    "PICKLE_IN_FILE",
    "CompareConfig",
    "FineTuneConfig",
    "PruneConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
    "format_validation_error",
    "load_config",
    "merge_overrides",
]
