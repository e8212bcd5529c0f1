"""Training checkpoints that load with ``torch.load(weights_only=True)``: no code of the
file's author runs when a run resumes from one."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .atomic import atomic_torch_save

__all__ = ["load_checkpoint", "save_checkpoint"]


def _checkpoint_safe(obj: Any, where: str) -> Any:
    """Convert numpy values to torch/python ones and reject anything that
    ``torch.load(weights_only=True)`` would refuse, naming the offending key."""
    if isinstance(obj, torch.Tensor | str | bool | int | float | type(None)):
        return obj
    if isinstance(obj, torch.dtype | torch.Size | torch.device):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        items = ((k, _checkpoint_safe(v, f"{where}.{k}")) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list | tuple):
        out = [_checkpoint_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    raise TypeError(
        f"checkpoint value at {where} has type {type(obj).__name__}, which cannot be loaded "
        "with weights_only=True; store tensors, numbers, strings, lists or dicts instead"
    )


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint dict that :func:`load_checkpoint` can load safely."""
    return atomic_torch_save(path, _checkpoint_safe(dict(state), "state"))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {p} is corrupt or holds objects that cannot be loaded safely "
            f"(weights_only=True): {first}"
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors from a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {p} is corrupt or truncated: {first}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(state).__name__}, not an eigendamage checkpoint dict"
        )
    return state
