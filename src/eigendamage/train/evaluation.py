"""Evaluation and BatchNorm recalibration.

Both run the model on batches by :mod:`eigendamage.modelcall`'s rules and restore every
module's train/eval mode afterwards, so calling them never changes what the caller's model
does next.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import DataError
from ..modelcall import (
    batch_inputs,
    call_model,
    check_labels,
    eval_mode,
    resolve_device,
    restored_modes,
    split_batch,
    to_device,
)


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy, accuracy in [0, 1] and the number of examples seen."""

    loss: float
    accuracy: float
    n: int


def evaluate(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None
) -> EvalResult:
    """Mean cross-entropy and accuracy in eval mode; the model's modes are restored after.

    Args:
        model: a classifier returning logits (or an output with ``.logits``).
        loader: ``(inputs, targets)`` batches, e.g. ``make_loaders(...).test``.
        device: where to run; None uses the device of the model's parameters, otherwise
            the model is moved there.

    Returns:
        The mean loss, the accuracy in [0, 1] and the number of examples.

    Raises:
        DataError: for a loader without examples or labels outside the model's classes.
    """
    dev = resolve_device(device, model)
    if device is not None:
        model.to(dev)
    total, correct, n = 0.0, 0, 0
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            inputs, targets = split_batch(batch)
            inputs, targets = to_device(inputs, dev), to_device(targets, dev)
            logits = call_model(model, inputs)
            check_labels(targets, logits.shape[1], "evaluation batch")
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.argmax(dim=1) == targets).sum().item()
            n += targets.shape[0]
    if n == 0:
        raise DataError("evaluation loader yielded no examples")
    return EvalResult(loss=total / n, accuracy=correct / n, n=n)


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    batches: int | None = None,
    device: str | torch.device | None = None,
) -> int:
    """Re-estimate BatchNorm running statistics after surgery; returns examples used.

    Running stats are reset and re-accumulated as an exact average (``momentum=None``) over
    ``batches`` batches (all when None; 0 does nothing).  Only BN layers are put in train
    mode: dropout stays off, so the statistics match what the network sees at test time.
    Momentum and train/eval modes are restored; no gradients are computed.
    """
    if batches == 0:
        return 0
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    dev = resolve_device(device, model)
    if device is not None:
        model.to(dev)
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        with restored_modes(model), torch.no_grad():
            model.eval()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for i, batch in enumerate(loader):
                if batches is not None and i >= batches:
                    break
                call_model(model, to_device(batch_inputs(batch), dev))
                seen += len(batch[1]) if isinstance(batch, list | tuple) and len(batch) > 1 else 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
    if seen == 0:
        raise DataError("BatchNorm recalibration loader yielded no batches")
    return seen
