"""One exception family, so the CLI can turn any expected failure into one clear line.

Every error raised on bad user input derives from :class:`EigenDamageError`; its message
says what went wrong, where (file, layer, option) and what to do about it.  Anything else
reaching the CLI is a bug and is shown with its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EigenDamageError(Exception):
    """Base class for errors caused by user input or environment, not by bugs."""

    exit_code = 2  # the command line's exit status for this error


class ResourceError(EigenDamageError):
    """The machine ran out of something a run needs (disk space), like out of memory."""

    exit_code = 3


class ConfigError(EigenDamageError):
    """A config value, option or combination of options is invalid."""


class DataError(EigenDamageError):
    """A dataset is missing, unreadable, corrupt or laid out wrongly."""


class ModelError(EigenDamageError):
    """A model cannot be built, loaded or pruned as asked."""


class CurvatureError(EigenDamageError):
    """Curvature could not be estimated (non-finite loss or factors, singular factors)."""


class OutputExistsError(EigenDamageError):
    """An output directory exists and would be overwritten."""


class CheckpointError(EigenDamageError):
    """A checkpoint is missing, truncated, corrupt or holds objects that cannot load safely."""


class OutputInUseError(OutputExistsError):
    """Another eigendamage run holds the output directory (see :func:`lock_output_dir`)."""


class SingularFactorError(CurvatureError):
    """A factor is too ill-conditioned for the step at the current damping."""


class TrainingError(EigenDamageError):
    """Training diverged (non-finite loss) or cannot continue from a checkpoint."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name, with the closest valid names as a hint."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Choose one of: {', '.join(choices)}."
