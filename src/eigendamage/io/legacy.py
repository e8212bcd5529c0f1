"""The model files a user points at beyond model directories: ``.safetensors`` state_dicts
and legacy ``torch.save`` pickles, the latter only on request (``--allow-pickle``)."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ModelError
from .architecture import ARCHITECTURE_FILE, WEIGHTS_FILE
from .model_dir import load_model

__all__ = ["PICKLE_RISK", "load_model_file"]

PICKLE_RISK = (
    "unpickling runs whatever code the file's author put in it; pass --allow-pickle only for "
    "files you trust"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _state_dict_in(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The tensors of a state_dict, also inside the usual ``{"state_dict": ...}`` wrappers."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        inner = _state_dict_in(obj.get(key))
        if inner is not None:
            return inner
    return None


def _load_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: Path
) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelError(
            f"checkpoint {source} does not fit the --model architecture: {detail[:300]}"
        ) from None
    return model


def load_model_file(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    build: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Load the model a user points at: a :func:`save_model` directory, a ``.safetensors``
    state_dict, or a legacy ``torch.save`` file.

    Why the opt-in: ``torch.save`` files are pickles, and loading one can execute arbitrary
    code.  They load only with ``allow_pickle``: a whole pickled module with
    ``torch.load(weights_only=False)``, or -- when ``build`` makes the architecture (the
    ``--model`` name) -- a state_dict with ``weights_only=True``.  A pickled module must
    come from ``create_model`` so that its pruned result can be saved pickle-free.  Loading
    one logs a warning naming the file (the ``eigendamage`` logger; the CLI prints it).
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(
            f"checkpoint {p} not found; pass a model directory written by `eigendamage train` "
            "or `eigendamage prune` (its model/ folder)"
        )
    if p.is_dir() or p.name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
        if build is not None:
            raise ModelError(
                f"checkpoint {p} is a model directory that records its own architecture; "
                "drop --model (it is only for state_dict files)"
            )
        return load_model(p)
    if p.suffix == ".safetensors":
        if build is None:
            raise ModelError(
                f"checkpoint {p} holds only weights; pass --model NAME to build the architecture"
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read weights {p}: {_first_line(exc)}") from exc
        return _load_state_dict(build(), state, p)
    if not allow_pickle:
        raise ModelError(
            f"checkpoint {p} is a pickle (torch.save) file, not a model directory; "
            f"{PICKLE_RISK} (add --model NAME if it holds a state_dict)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=build is not None)
    except pickle.UnpicklingError as exc:
        if build is not None:
            raise ModelError(
                f"checkpoint {p} holds pickled objects, not only tensors (a whole model?); "
                "drop --model to load it as a whole pickled model"
            ) from exc
        raise CheckpointError(f"checkpoint {p} is corrupt: {_first_line(exc)}") from exc
    except (ImportError, AttributeError) as exc:  # the pickled classes are not importable
        raise CheckpointError(
            f"checkpoint {p} needs code that is not importable here: {_first_line(exc)}"
        ) from exc
    except Exception as exc:  # zip/EOF errors of a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {p} is corrupt or truncated: {_first_line(exc)}"
        ) from exc
    if build is not None:
        state = _state_dict_in(obj)
        if state is None:
            raise ModelError(f"checkpoint {p} holds no state_dict of tensors")
        return _load_state_dict(build(), state, p)
    if _state_dict_in(obj) is not None:
        raise ModelError(
            f"checkpoint {p} holds a state_dict, not a model; pass --model NAME to build the "
            "architecture it belongs to"
        )
    if not isinstance(obj, nn.Module):
        raise ModelError(f"checkpoint {p} holds a {type(obj).__name__}, not a torch model")
    if not isinstance(getattr(obj, "eigendamage_spec", None), Mapping):
        # Its pruned result could not be saved pickle-free: fail now, not after the run.
        raise ModelError(
            f"checkpoint {p} holds a {type(obj).__name__} not made by eigendamage's model "
            "registry; save its state_dict instead and pass --model NAME"
        )
    # Said once the model is in use (a failed load is one `error:` line already); a state_dict
    # read above went through torch's tensors-only unpickler, which runs no code.
    logging.getLogger("eigendamage").warning(
        "--allow-pickle: unpickling %s runs any code it holds", p
    )
    return obj
