"""Calling a model on a loader's batch: one set of rules for every pass over data.

Why one module: curvature, training, evaluation, FLOP counting and latency all run models on
batches, and each used to decide for itself which batch shapes and model outputs it
understood.  The rules here are the union of what they accepted:

* a **batch** is an ``(inputs, targets, ...)`` list or tuple (extra items are ignored), or a
  mapping of keyword inputs that holds the targets under ``"labels"`` (Hugging Face style);
* **inputs** are a tensor (one positional argument), a list or tuple (positional
  arguments) or a mapping (keyword arguments);
* an **output** holds the logits as a tensor, as ``.logits`` (HF outputs), under a mapping's
  ``"logits"`` key or as the first element of a tuple or list.

A batch of another shape raises :class:`~eigendamage.errors.DataError`, an output without
logits :class:`~eigendamage.errors.ModelError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import DataError, ModelError

IGNORE_INDEX = -100  # cross-entropy's "no label here" (padding tokens)
LABELS_KEY = "labels"  # the targets' key in a mapping batch


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """The device a pass runs on: the model's own for None, CUDA if present for ``"auto"``.

    Args:
        device: a device, ``"auto"`` or None.
        model: the model whose device None stands for.

    Returns:
        The device.
    """
    if device is None:
        return model_device(model)
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it (nested in lists, tuples, mappings) on ``device``.

    Args:
        batch: a tensor, or lists, tuples and mappings of them; other values pass unchanged.
        device: the target device.

    Returns:
        The same structure (mappings become dicts) holding the moved tensors.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_batch(batch: Any, step: int | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one loader batch (see the module docstring for the shapes).

    Args:
        batch: what the loader yielded.
        step: the batch's index in the loader, named in the error message when given.

    Returns:
        The inputs (a tensor, a tuple or a dict without ``"labels"``) and the targets.

    Raises:
        DataError: the batch is neither a pair nor a mapping with ``"labels"``.
    """
    if isinstance(batch, Mapping) and LABELS_KEY in batch:
        inputs = {k: v for k, v in batch.items() if k != LABELS_KEY}
        return inputs, batch[LABELS_KEY]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    where = "a loader batch" if step is None else f"batch {step} of the loader"
    length = f" of length {len(batch)}" if isinstance(batch, list | tuple) else ""
    raise DataError(
        f"{where} is a {type(batch).__name__}{length}; expected (inputs, targets) pairs or "
        f"a dict with {LABELS_KEY!r}"
    )


def batch_inputs(batch: Any) -> Any:
    """The inputs of a batch that may also come without targets (a bare tensor or dict)."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != LABELS_KEY}
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` called on ``inputs``: keyword arguments for a mapping, positional ones for a
    list or tuple, the one argument otherwise.  Returns the raw output."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    return model(inputs)


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run the model on a batch's inputs and return its logits.

    Args:
        model: any module whose output :func:`logits_of` understands.
        inputs: the batch's inputs (see :func:`run_model`).

    Returns:
        The logits tensor.

    Raises:
        ModelError: the output holds no logits.
    """
    return logits_of(run_model(model, inputs))


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a tensor, an output with ``.logits``, a mapping or a tuple.

    Args:
        out: what the model returned.

    Returns:
        The logits tensor.

    Raises:
        ModelError: none of the accepted forms holds a tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, tuple | list) and out:
        logits = out[0]
    if isinstance(logits, torch.Tensor):
        return logits
    raise ModelError(
        f"cannot find logits in a model output of type {type(out).__name__}; "
        "return a tensor, a tuple starting with the logits, or an object with .logits"
    )


@contextmanager
def restored_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag afterwards, whatever the body sets."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, restoring every submodule's own flag afterwards."""
    with restored_modes(model):
        model.eval()
        yield


def check_labels(labels: Any, num_classes: int, where: str) -> None:
    """Class labels must lie in ``[0, num_classes)`` (or be ``IGNORE_INDEX``).

    Why: cross-entropy fails on others with a bare ``IndexError`` on the CPU and a device
    assert that poisons the CUDA context on a GPU; this names the value and the classes.
    Soft (floating-point) targets are not class labels and pass unchecked.

    Args:
        labels: the batch's targets.
        num_classes: the model's number of outputs.
        where: the batch, named in the message.

    Raises:
        DataError: a label is out of range.
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        return
    bad = (labels >= num_classes) | ((labels < 0) & (labels != IGNORE_INDEX))
    if bad.any():
        value = int(labels[bad].flatten()[0])
        raise DataError(
            f"{where}: label {value} is outside [0, {num_classes}): the model has "
            f"{num_classes} classes; the dataset's labels do not match the model's output "
            "layer (use a model built for this dataset, or remap the labels)"
        )
