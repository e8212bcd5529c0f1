"""Gradients for Torch-Pruning's Taylor and Hessian criteria (``tp-taylor``, ``tp-hessian``).

Why our own: TP 1.6's ``HessianImportance.accumulate_grad`` keeps only the last example's
gradient; here the Hessian criterion gets the mean over examples of squared per-example
gradients (the diagonal empirical Fisher of OBD), and Taylor the summed batch-mean
gradients of TP's examples (``loss.backward()`` per batch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, CurvatureError
from ..modelcall import (
    IGNORE_INDEX,
    call_model,
    check_labels,
    eval_mode,
    model_device,
    split_batch,
    to_device,
)

GRADIENT_METHODS = ("tp-taylor", "tp-hessian")
DEFAULT_BATCHES = 10  # TP's examples accumulate gradients over a few (10) training batches


def gradients(
    model: nn.Module, loader: Iterable, *, squared: bool, batches: int, device: Any
) -> dict[str, torch.Tensor]:
    """Per-parameter gradients of the cross-entropy on the first ``batches`` batches, in
    eval mode (BN statistics untouched): summed batch-mean gradients (Taylor, as TP's
    ``loss.backward()`` per batch), or the mean over examples of squared per-example
    gradients (Hessian, the diagonal empirical Fisher of OBD)."""
    dev = torch.device(device) if device is not None else model_device(model)
    work = copy.deepcopy(model).to(dev)
    params = dict(work.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    examples = 0

    def add(loss: torch.Tensor, power: int) -> None:
        if not torch.isfinite(loss):
            raise CurvatureError(f"non-finite loss ({loss.item()}): check inputs and model")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                sums[name] += g.pow(power)

    with eval_mode(work), torch.enable_grad():
        for step, batch in enumerate(loader):
            if step >= batches:
                break
            inputs, labels = split_batch(batch, step)
            inputs, labels = to_device(inputs, dev), to_device(labels, dev)
            # Hessian: one forward per example (exact in eval mode), Taylor: the batch
            for i in range(len(labels)) if squared else [None]:
                x, y = (inputs, labels) if i is None else (_take(inputs, i), labels[i : i + 1])
                add(_loss(work, x, y, step), 2 if squared else 1)
                examples += 1
    if examples == 0:
        raise ConfigError("the loader yielded no batch: Taylor/Hessian need training data")
    scale, home = (1.0 / examples if squared else 1.0), model_device(model)
    return {n: (s * scale).to(home) for n, s in sums.items()}


def _loss(model: nn.Module, inputs: Any, labels: torch.Tensor, step: int) -> torch.Tensor:
    logits = call_model(model, inputs)
    check_labels(labels, logits.shape[-1], f"batch {step} of the loader")
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _take(inputs: Any, i: int) -> Any:
    """Example ``i`` of a batch's inputs (a tensor, a tuple of them or a dict), kept batched."""
    if isinstance(inputs, torch.Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, dict):
        return {k: _take(v, i) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_take(v, i) for v in inputs)
    return inputs
