"""Building plain layers from matrices: the pieces every surgery assembles.

Why a module of its own: eigenbasis bottlenecks, depthwise-separable cores and the
reparameterisation all make new Linear/Conv2d layers that keep a template layer's
geometry and the model's device and dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def pointwise(
    template: nn.Module, mat: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
) -> nn.Module:
    """``mat`` (out, in) as a 1x1 conv (or Linear, after ``template``'s type)."""
    out_f, in_f = mat.shape
    if isinstance(template, nn.Conv2d):
        layer = nn.Conv2d(in_f, out_f, 1, bias=bias is not None)
        weight = mat.reshape(out_f, in_f, 1, 1)
    else:
        layer = nn.Linear(in_f, out_f, bias=bias is not None)
        weight = mat
    return load_weights(layer, weight, bias, like)


def core_like(
    template: nn.Module, core: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
) -> nn.Module:
    """``core`` (d_out, d_in, kh*kw) as a layer of ``template``'s type and geometry."""
    d_out, d_in, _ = core.shape
    if isinstance(template, nn.Conv2d):
        layer = conv_like(template, d_in, d_out, bias=bias is not None)
        weight = core.reshape(d_out, d_in, *template.kernel_size)
    else:
        layer = nn.Linear(d_in, d_out, bias=bias is not None)
        weight = core[..., 0]
    return load_weights(layer, weight, bias, like)


def conv_like(
    template: nn.Conv2d, c_in: int, c_out: int, *, bias: bool, groups: int = 1
) -> nn.Conv2d:
    """A new conv with ``template``'s kernel, stride, padding, dilation and padding mode."""
    return nn.Conv2d(
        c_in,
        c_out,
        template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=groups,
        bias=bias,
        padding_mode=template.padding_mode,
    )


def load_weights(
    layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
) -> nn.Module:
    """``layer`` on ``like``'s device and dtype, holding ``weight`` (and ``bias``)."""
    layer = layer.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(like.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(like.dtype))
    return layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
