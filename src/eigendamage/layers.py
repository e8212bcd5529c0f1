"""One adapter per kind of weight layer: its weight as an ``(out, in)`` matrix, its units and
how its inputs and output gradients are read as rows.

Why: curvature, scoring and surgery all treat a weight layer as a matrix that maps input
rows to output rows; what differs between ``nn.Linear``, ``nn.Conv2d`` and GPT-2's
``Conv1D`` is only where the rows come from.  An adapter says it once per kind instead of
an ``isinstance`` branch in every function.

Rows: a layer's input is read as ``(N, groups, T, d_in/groups)`` -- ``T`` locations (im2col
patches of a conv, in ``weight.flatten(1)`` column order) or tokens (1 for a plain vector)
-- and its output gradient as ``(N, groups, T, d_out/groups)``.

GPT-2's ``Conv1D`` (a Linear with a transposed weight) has an adapter but is no curvature
target: the model registry turns it into ``nn.Linear`` at build time
(:func:`eigendamage.models.external.linearize_conv1d`), so K-FAC and surgery never see it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

LayerKind = Literal["linear", "conv2d", "gpt2_conv1d"]

# Subclasses known to compute exactly their base class's forward.
_PLAIN_SUBCLASSES = ("timm.layers.linear.Linear",)
_GPT2_CONV1D = "transformers.pytorch_utils.Conv1D"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class LayerAdapter(ABC):
    """The interface, with the rules of a layer whose features are last (Linear-like): every
    leading position (token, pixel) is one row.  Adapters override what differs."""

    kind: LayerKind
    curvature = True  # K-FAC, scoring and surgery handle it in place
    units = ("in_features", "out_features")  # the module's attributes: (in, out) units

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True for the modules of this kind."""

    @abstractmethod
    def computes_plain(self, module: nn.Module) -> bool:
        """True when the module's forward is exactly the plain layer's."""

    def matrix(self, module: nn.Module) -> torch.Tensor:
        """The weight as an ``(out, in)`` matrix (a conv's kernel offsets in ``in``)."""
        return module.weight

    def in_units(self, module: nn.Module) -> int:
        """Input features or channels."""
        return getattr(module, self.units[0])

    def out_units(self, module: nn.Module) -> int:
        """Output features or channels."""
        return getattr(module, self.units[1])

    def groups(self, module: nn.Module) -> int:
        """Blocks of the block-diagonal weight (a grouped conv's groups)."""
        return 1

    def kernel_numel(self, module: nn.Module) -> int:
        """Input rows each output row reads per input unit (kernel offsets)."""
        return 1

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input as ``(N, groups, T, d_in/groups)`` rows."""
        return linear_rows(x)

    def output_matrix(self, grad: torch.Tensor) -> torch.Tensor:
        """Output gradients as ``(rows, d_out)``."""
        return grad.reshape(-1, grad.shape[-1])

    def output_rows(self, grad: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Output gradients as ``(N, groups, T, d_out/groups)``."""
        n, o = grad.shape[0], grad.shape[-1]
        return grad.reshape(n, 1, -1, o)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` (on vectors or on token/pixel maps with features last)."""

    kind: LayerKind = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def computes_plain(self, module: nn.Module) -> bool:
        return type(module).forward is nn.Linear.forward


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` in the KFC convention: every output location is a row, its input row
    the im2col patch (padding applied explicitly, every padding mode alike)."""

    kind: LayerKind = "conv2d"
    units = ("in_channels", "out_channels")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def computes_plain(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight.flatten(1)

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def kernel_numel(self, module: nn.Module) -> int:
        return module.kernel_size[0] * module.kernel_size[1]

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return unfold_patches(x, module)

    def output_matrix(self, grad: torch.Tensor) -> torch.Tensor:
        # a 4-D gradient is (N, O, H, W); otherwise features are last whatever the rank
        return channel_rows(grad) if grad.dim() == 4 else super().output_matrix(grad)

    def output_rows(self, grad: torch.Tensor, groups: int = 1) -> torch.Tensor:
        if grad.dim() != 4:
            return super().output_rows(grad, groups)
        n, o = grad.shape[:2]
        return grad.reshape(n, groups, o // groups, -1).transpose(2, 3)


class GPT2Conv1DAdapter(LayerAdapter):
    """``transformers``' ``Conv1D``: ``y = x @ weight + bias``, weight stored ``(in, out)``."""

    kind: LayerKind = "gpt2_conv1d"
    curvature = False  # converted to nn.Linear at build time (module docstring)

    def matches(self, module: nn.Module) -> bool:
        return any(_qualname(c) == _GPT2_CONV1D for c in type(module).__mro__)

    def computes_plain(self, module: nn.Module) -> bool:
        return False

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T

    def in_units(self, module: nn.Module) -> int:
        return module.weight.shape[0]

    def out_units(self, module: nn.Module) -> int:
        return module.weight.shape[1]


ADAPTERS: tuple[LayerAdapter, ...] = (Conv2dAdapter(), LinearAdapter(), GPT2Conv1DAdapter())


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of ``module``'s kind, or None for a module that is no weight layer.

    Args:
        module: any module.

    Returns:
        The first adapter of :data:`ADAPTERS` that matches, or None.
    """
    return next((a for a in ADAPTERS if a.matches(module)), None)


def adapter_of(module: nn.Module) -> LayerAdapter:
    """The adapter of a weight layer.

    Args:
        module: an nn.Linear, nn.Conv2d or GPT-2 Conv1D.

    Returns:
        Its adapter.

    Raises:
        ModelError: ``module`` is no weight layer that has an adapter.
    """
    adapter = adapter_for(module)
    if adapter is None:
        raise ModelError(
            f"{type(module).__name__} is not a weight layer (nn.Linear, nn.Conv2d or GPT-2's "
            "Conv1D)"
        )
    return adapter


def is_plain_layer(module: nn.Module) -> bool:
    """True when ``module`` computes exactly the plain nn.Linear/nn.Conv2d of its weights.

    Why: the factors are built from the layer's input as the hook sees it; a subclass with
    its own forward (timm's ``Conv2dSame`` pads inside it) would get silently wrong ones.
    """
    adapter = adapter_for(module)
    if adapter is None or not adapter.curvature:
        return False
    return _qualname(type(module)) in _PLAIN_SUBCLASSES or adapter.computes_plain(module)


# --------------------------------------------------------------------------- reading rows


def linear_rows(inputs: torch.Tensor) -> torch.Tensor:
    """Linear inputs as ``(N, 1, T, in_features)`` (T = tokens, 1 for plain vectors)."""
    return inputs.reshape(inputs.shape[0], 1, -1, inputs.shape[-1])


def channel_rows(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` as ``(N*H*W, C)`` rows: a view for channels_last, one copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def padding_amounts(conv: nn.Conv2d) -> list[int]:
    """``[left, right, top, bottom]`` padding of a conv (``F.pad`` order), 'same' included."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [0, 0, 0, 0]
        # 'same': total padding dilation*(k-1), extra on the right/bottom like PyTorch.
        pads: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = conv.padding
    return [pw, pw, ph, ph]


def pad_input(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply a conv's padding explicitly (so every padding mode is handled alike)."""
    pads = padding_amounts(conv)
    if not any(pads):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def unfold_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col: ``(N, groups, T, c_in/groups*kh*kw)`` patches in ``weight.flatten(1)`` order."""
    xp = pad_input(x, conv)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    n, ck, t = cols.shape
    g = conv.groups
    # unfold orders channels major, offsets minor: matches weight.flatten(1) per group.
    return cols.view(n, g, ck // g, t).transpose(2, 3)
