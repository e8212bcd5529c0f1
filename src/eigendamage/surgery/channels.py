"""Physical channel removal, its zero-mask reference, and OBS weight compensation.

A removal plan is ``{(module_name, dim): removed indices}`` with ``dim`` "out" (output
channels / BN features) or "in" (input channels), as produced by
:meth:`eigendamage.structure.ChannelGroups.removal_plan`.  Removal slices the parameters
and buffers of Conv2d, Linear and BatchNorm in place, so the result is an ordinary smaller
``nn.Module``: no masks, no hooks, loadable with a plain ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from ..errors import ModelError

Dim = Literal["out", "in"]  # output channels (and BN features) or input channels
Plan = Mapping[tuple[str, Dim], torch.Tensor]
_BN = nn.modules.batchnorm._BatchNorm


def remove_channels_(model: nn.Module, plan: Plan) -> nn.Module:
    """Delete the planned channels of ``model`` in place; returns ``model``."""
    for (name, dim), removed in plan.items():
        module = model.get_submodule(name)
        size = _size(module, dim, name)
        keep = _kept(removed, size, name)
        if isinstance(module, _BN):
            _slice_bn(module, keep)
        elif isinstance(module, nn.Linear):
            _slice_param(module, "weight", keep, 0 if dim == "out" else 1)
            if dim == "out":
                _slice_param(module, "bias", keep, 0)
                module.out_features = len(keep)
            else:
                module.in_features = len(keep)
        elif _is_depthwise(module):
            _slice_param(module, "weight", keep, 0)
            _slice_param(module, "bias", keep, 0)
            module.in_channels = module.out_channels = module.groups = len(keep)
        elif dim == "out":
            _slice_param(module, "weight", keep, 0)
            _slice_param(module, "bias", keep, 0)
            module.out_channels = len(keep)
        else:
            _slice_param(module, "weight", keep, 1)
            module.in_channels = len(keep)
    return model


def zero_channels_(model: nn.Module, plan: Plan) -> nn.Module:
    """Make the planned OUTPUT channels identically zero in place (the masked reference).

    Producer weight rows and biases are zeroed, and BatchNorm weight and bias (or, without
    affine parameters, its running mean) so that BN maps the zero channel to exactly 0.
    """
    with torch.no_grad():
        for (name, dim), removed in plan.items():
            if dim != "out":
                continue
            module = model.get_submodule(name)
            _kept(removed, _size(module, dim, name), name)  # validates the indices
            if isinstance(module, _BN) and not module.affine:
                module.running_mean[removed] = 0
                continue
            module.weight[removed] = 0
            if module.bias is not None:
                module.bias[removed] = 0
    return model


def apply_weight_update_(model: nn.Module, updates: Mapping[str, torch.Tensor]) -> nn.Module:
    """Add an OBS compensation ``Delta W`` to layers in place; returns ``model``.

    ``updates[name]`` is shaped like ``weight.flatten(1)``, optionally with a trailing bias
    column (the K-FAC homogeneous coordinate), in the layout the criteria produce.
    """
    with torch.no_grad():
        for name, delta in updates.items():
            module = model.get_submodule(name)
            w = module.weight
            cols = w[0].numel()
            has_bias_col = delta.shape[-1] == cols + 1
            if delta.shape[0] != w.shape[0] or not (delta.shape[-1] == cols or has_bias_col):
                raise ModelError(
                    f"layer {name!r}: weight update of shape {tuple(delta.shape)} does not fit "
                    f"weight {tuple(w.shape)}"
                )
            delta = delta.to(w.device, w.dtype)
            w.add_(delta[:, :cols].reshape(w.shape))
            if has_bias_col:
                if module.bias is None:
                    raise ModelError(f"layer {name!r}: update has a bias column but no bias")
                module.bias.add_(delta[:, cols])
    return model


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == module.in_channels == module.out_channels > 1
    )


def _size(module: nn.Module, dim: Dim, name: str) -> int:
    if isinstance(module, _BN):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and not _is_depthwise(module):
            raise ModelError(
                f"layer {name!r}: grouped convs (groups={module.groups}) not supported"
            )
        return module.out_channels if dim == "out" else module.in_channels
    raise ModelError(f"layer {name!r}: cannot remove channels of {type(module).__name__}")


def _kept(removed: torch.Tensor, size: int, name: str) -> torch.Tensor:
    removed = torch.as_tensor(removed, dtype=torch.long)
    if removed.numel() and (removed.min() < 0 or removed.max() >= size):
        raise ModelError(f"layer {name!r}: channel indices must lie in [0, {size})")
    mask = torch.ones(size, dtype=torch.bool)
    mask[removed] = False
    if not mask.any():
        raise ModelError(f"layer {name!r}: removing all {size} channels; keep at least one")
    return mask.nonzero().flatten()


def _slice_param(module: nn.Module, attr: str, keep: torch.Tensor, dim: int) -> None:
    p = getattr(module, attr)
    if p is None:
        return
    new = p.data.index_select(dim, keep.to(p.device)).clone()
    setattr(module, attr, nn.Parameter(new, requires_grad=p.requires_grad))


def _slice_bn(module: nn.Module, keep: torch.Tensor) -> None:
    _slice_param(module, "weight", keep, 0)
    _slice_param(module, "bias", keep, 0)
    for buf in ("running_mean", "running_var"):
        t = getattr(module, buf)
        if t is not None:
            setattr(module, buf, t.index_select(0, keep.to(t.device)).clone())
    module.num_features = len(keep)
