"""Reparameterisation of Linear/Conv2d layers in their Kronecker-factored eigenbasis.

A layer ``y = W x + b`` becomes ``y = Q_S (W' (Q_A^T x)) + b`` with ``W' = Q_S^T W Q_A``
(for Conv2d at every kernel offset): a :class:`KFEBottleneck` of

* ``rot_in``  -- a 1x1 conv (or Linear) with weight ``Q_A^T``,
* ``core``    -- the original layer type/stride/padding/dilation with weight ``W'``,
* ``rot_out`` -- a 1x1 conv (or Linear) with weight ``Q_S`` and the original bias.

The layer keeps its input and output widths, so BatchNorm, activations, residual adds and
concats around it are untouched: no dependency graph is needed.  Pruning removes rows
(output eigen-directions) and columns (input eigen-directions) of the core together with
the matching rows of ``rot_in`` and columns of ``rot_out``.

Beyond the paper, after pruning each layer takes the cheapest *exact* form of the same
function: the full bottleneck, ``rot_out`` folded into the core (a two-layer low-rank
factorisation), ``rot_in`` folded into the core, or -- when no pruned form is smaller than
the dense layer -- the dense layer left unpruned (the original code's rule).  A folded
side is an ``nn.Identity``; a later round treats it as the identity rotation.

:func:`to_eigenbasis` also takes the factors' other conventions, as a bottleneck that is
exact but outside the forms above (no pruning, no later rounds): a patch-mode ``Q_A``
(side ``c_in*kh*kw``) makes ``rot_in`` a ``kh x kw`` conv from ``c_in`` to ``c_in*kh*kw``
channels with the layer's stride/padding and the core a 1x1 conv; the bias coordinate
(``Q_A`` one larger) becomes ``rot_in``'s bias, the last row of ``Q_A``, and the layer's
bias moves into the core.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, get_args, overload

import torch
from torch import nn

from ..curvature.factors import KFE
from ..errors import ModelError
from ..layers import is_plain_layer
from .modules import conv_like, core_like, load_weights, pointwise, set_submodule

logger = logging.getLogger("eigendamage")

Form = Literal["full", "fold_out", "fold_in", "dense"]
FORMS: tuple[Form, ...] = get_args(Form)


class KFEBottleneck(nn.Sequential):
    """``rot_in -> core -> rot_out``; either rotation may be ``nn.Identity`` (folded)."""

    def __init__(self, rot_in: nn.Module, core: nn.Module, rot_out: nn.Module):
        super().__init__(OrderedDict(rot_in=rot_in, core=core, rot_out=rot_out))


@dataclass
class Factored:
    """A layer as matrices: ``y = P_out core(P_in x) + bias``.

    ``core`` is ``(d_out', d_in', K)`` (K = kh*kw; 1 for Linear); ``p_in`` is
    ``(d_in', c_in)`` and ``p_out`` ``(c_out, d_out')``; ``None`` means the identity.
    ``template`` is the layer whose type/stride/padding/dilation the core keeps.
    """

    p_in: torch.Tensor | None
    core: torch.Tensor
    p_out: torch.Tensor | None
    bias: torch.Tensor | None
    template: nn.Module

    @property
    def c_in(self) -> int:
        return self.core.shape[1] if self.p_in is None else self.p_in.shape[1]

    @property
    def c_out(self) -> int:
        return self.core.shape[0] if self.p_out is None else self.p_out.shape[0]


def core_layer(module: nn.Module) -> nn.Module:
    """The layer whose curvature drives a module's pruning (the core of a bottleneck)."""
    return module.core if isinstance(module, KFEBottleneck) else module


def to_factored(module: nn.Module) -> Factored:
    """Read a plain layer or a bottleneck as :class:`Factored` matrices (float64 copies)."""
    if isinstance(module, KFEBottleneck):
        if not is_channel_form(module):
            raise ModelError(
                "a bottleneck from patch-mode or bias-coordinate factors is exact but cannot "
                "be pruned or rotated again; build it from collect_kfac(conv_mode='channel') "
                "and eigendecompose(drop_bias=True)"
            )
        core = to_factored(module.core)
        p_in = None if isinstance(module.rot_in, nn.Identity) else _matrix(module.rot_in)
        p_out = None if isinstance(module.rot_out, nn.Identity) else _matrix(module.rot_out)
        bias = core.bias if p_out is None else _bias(module.rot_out)
        return Factored(p_in, core.core, p_out, bias, module.core)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ModelError("grouped convolutions are left dense by EigenDamage")
        w = module.weight.detach().double()
        return Factored(None, w.flatten(2), None, _bias(module), module)
    if isinstance(module, nn.Linear):
        w = module.weight.detach().double()
        return Factored(None, w.unsqueeze(-1), None, _bias(module), module)
    raise ModelError(f"cannot reparameterise a {type(module).__name__}")


def is_channel_form(bottleneck: KFEBottleneck) -> bool:
    """True when ``rot_in`` is a bias-free 1x1 map (or folded): the forms of this module."""
    rot = bottleneck.rot_in
    if isinstance(rot, nn.Identity):
        return True
    if isinstance(rot, nn.Linear):
        return rot.bias is None
    return (
        isinstance(rot, nn.Conv2d)
        and rot.bias is None
        and rot.kernel_size == (1, 1)
        and rot.stride == (1, 1)
        and rot.padding in ((0, 0), "valid")
        and rot.groups == 1
    )


def _matrix(rot: nn.Module) -> torch.Tensor:
    return rot.weight.detach().double().reshape(rot.weight.shape[0], rot.weight.shape[1])


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().double()


def in_eigenbasis(f: Factored, kfe: KFE) -> Factored:
    """Express ``f`` in the eigenbasis ``kfe`` of its core (exact: Q's are orthogonal).

    ``core' = Q_S^T core Q_A``, ``P_in' = Q_A^T P_in``, ``P_out' = P_out Q_S``: merging new
    bases into old ones so that bottlenecks never stack over rounds.
    """
    q_a = kfe.A.Q.double()
    q_s = kfe.S.Q.double()
    if q_a.shape[0] != f.core.shape[1] or q_s.shape[0] != f.core.shape[0]:
        raise ModelError(
            f"eigenbasis sizes {tuple(q_s.shape)}/{tuple(q_a.shape)} do not match the layer "
            f"core {tuple(f.core.shape[:2])}: a bottleneck takes factors collected with "
            "conv_mode='channel' and decomposed with drop_bias=True"
        )
    core = torch.einsum("po,pqk,qi->oik", q_s, f.core, q_a)
    p_in = q_a.T if f.p_in is None else q_a.T @ f.p_in
    p_out = q_s if f.p_out is None else f.p_out @ q_s
    return Factored(p_in, core, p_out, f.bias, f.template)


def keep_directions(f: Factored, keep_in: torch.Tensor, keep_out: torch.Tensor) -> Factored:
    """Keep only the given input/output directions of the core."""
    if f.p_in is None or f.p_out is None:
        raise ModelError("keep_directions() needs a rotated layer (see in_eigenbasis())")
    return Factored(
        f.p_in[keep_in],
        f.core[keep_out][:, keep_in],
        f.p_out[:, keep_out],
        f.bias,
        f.template,
    )


def form_params(f: Factored, form: Form) -> int:
    """Parameter count of ``f`` built in ``form`` (biases excluded: equal in all forms)."""
    d_out, d_in, k = f.core.shape
    c_in, c_out = f.c_in, f.c_out
    p_in = 0 if f.p_in is None else d_in * c_in
    p_out = 0 if f.p_out is None else c_out * d_out
    if form == "full":
        return p_in + d_out * d_in * k + p_out
    if form == "fold_out":
        return p_in + c_out * d_in * k
    if form == "fold_in":
        return d_out * c_in * k + p_out
    return c_out * c_in * k


def cheapest_form(f: Factored, dense_params: int) -> Form:
    """The smallest exact form; ``"dense"`` when no pruned form beats the dense layer."""
    best = min(FORMS[:3], key=lambda form: form_params(f, form))
    return best if form_params(f, best) < dense_params else "dense"


def build_form(f: Factored, form: Form = "full") -> nn.Module:
    """Materialise ``f`` as ordinary modules in the requested form."""
    p_in, core, p_out = f.p_in, f.core, f.p_out
    if form in ("fold_out", "dense") and p_out is not None:
        core, p_out = torch.einsum("cp,pik->cik", p_out, core), None
    if form in ("fold_in", "dense") and p_in is not None:
        core, p_in = torch.einsum("oik,ic->ock", core, p_in), None
    like = f.template.weight
    rot_in = nn.Identity() if p_in is None else pointwise(f.template, p_in, None, like)
    core_bias = f.bias if p_out is None else None
    core_mod = core_like(f.template, core, core_bias, like)
    rot_out = nn.Identity() if p_out is None else pointwise(f.template, p_out, f.bias, like)
    if form == "dense":
        return core_mod
    return KFEBottleneck(rot_in, core_mod, rot_out)


def layer_path(core_name: str, model: nn.Module) -> str:
    """Path of the module to replace for a target core (its bottleneck, if it has one)."""
    parent_name, _, child = core_name.rpartition(".")
    if child == "core" and isinstance(model.get_submodule(parent_name), KFEBottleneck):
        return parent_name
    return core_name


@overload
def to_eigenbasis(
    model: nn.Module, kfe: dict[str, KFE], *, return_skipped: Literal[False] = False
) -> nn.Module: ...


@overload
def to_eigenbasis(
    model: nn.Module, kfe: dict[str, KFE], *, return_skipped: Literal[True]
) -> tuple[nn.Module, dict[str, str]]: ...


def to_eigenbasis(
    model: nn.Module, kfe: dict[str, KFE], *, return_skipped: bool = False
) -> nn.Module | tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with every layer of ``kfe`` rewritten in its eigenbasis.

    The copy computes the same function up to float round-off; ``model`` is not modified.
    The factors' convention is read from the sizes of ``Q_A``.  Channel mode without the
    bias coordinate (``collect_kfac(conv_mode="channel")``,
    ``eigendecompose(drop_bias=True)``: EigenDamage's convention) gives full bottlenecks
    (:class:`KFEBottleneck`) that pruning works on; patch mode and the bias coordinate
    (the defaults) give the exact bottlenecks of the module docstring, which cannot be
    pruned further.  Layers that cannot be rewritten -- grouped and depthwise convs,
    other layer types, subclasses with their own forward, layers inside
    ``nn.MultiheadAttention``, the rotations of a bottleneck -- are left as they are.

    Args:
        model: the network; it is only read.
        kfe: ``{layer or bottleneck-core name: KFE}``, e.g. from
            :func:`~eigendamage.curvature.eigendecompose`.
        return_skipped: also return the layers left as they are.

    Returns:
        The rewritten copy; with ``return_skipped``, ``(copy, {name: reason})`` for the
        layers of ``kfe`` left as they are (also logged at INFO level).

    Raises:
        ModelError: a name of ``kfe`` is not a submodule of ``model``, or a layer's
            eigenbasis fits none of the conventions (factors of another model).
    """
    new = copy.deepcopy(model)
    inside_mha = {
        id(child)
        for module in new.modules()
        if isinstance(module, nn.MultiheadAttention)
        for child in module.children()
    }
    skipped: dict[str, str] = {}
    for core_name, basis in kfe.items():
        try:
            path = layer_path(core_name, new)
            layer = new.get_submodule(path)
        except AttributeError as err:
            raise ModelError(f"layer {core_name!r} of the eigenbases is not in the model") from err
        reason = _unsupported(layer, id(layer) in inside_mha) or _rotation_of(new, path)
        if reason:
            skipped[core_name] = reason
            continue
        set_submodule(new, path, _rotated(layer, basis, core_name))
    if skipped:
        logger.info("to_eigenbasis left %d layer(s) as they are: %s", len(skipped), skipped)
    return (new, skipped) if return_skipped else new


def _unsupported(layer: nn.Module, inside_mha: bool) -> str | None:
    """Why ``layer`` cannot be rewritten in an eigenbasis, or None."""
    if isinstance(layer, KFEBottleneck):
        return None if is_channel_form(layer) else "a patch-mode or bias-coordinate bottleneck"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return f"unsupported layer type {type(layer).__name__}"
    if inside_mha:
        return "inside nn.MultiheadAttention (weights used functionally)"
    if not is_plain_layer(layer):
        return f"{type(layer).__name__} overrides forward"
    return None


def _rotation_of(model: nn.Module, path: str) -> str | None:
    """A reason when ``path`` is the ``rot_in``/``rot_out`` of a bottleneck, or None: the
    core's eigenbasis rotates those; a basis of their own would nest bottlenecks."""
    parent = path.rpartition(".")[0]
    if parent and isinstance(model.get_submodule(parent), KFEBottleneck):
        return "a rotation of a bottleneck (rotated with its core)"
    return None


def _rotated(layer: nn.Module, basis: KFE, name: str) -> nn.Module:
    """``layer`` in ``basis``, after the convention ``basis``'s sizes reveal."""
    side, s_side = basis.A.Q.shape[-1], basis.S.Q.shape[-1]
    if isinstance(layer, KFEBottleneck) or side == layer.weight.shape[1]:
        return build_form(in_eigenbasis(to_factored(layer), basis), "full")
    patch = layer.weight[0].numel()
    coordinate = layer.bias is not None and side == patch + 1
    if (side != patch and not coordinate) or s_side != len(layer.weight):
        raise ModelError(
            f"layer {name!r}: eigenbasis sizes S {s_side}, A {side} fit neither channel mode "
            f"(A {layer.weight.shape[1]}) nor patch mode (A {patch}, {patch + 1} with the bias "
            f"coordinate) of its {len(layer.weight)} outputs: pass factors of this model"
        )
    return _patch_bottleneck(layer, basis, with_bias_coordinate=coordinate)


def _patch_bottleneck(layer: nn.Module, basis: KFE, *, with_bias_coordinate: bool) -> KFEBottleneck:
    """The exact bottleneck of a patch-mode (or Linear) eigenbasis (module docstring)."""
    q_a, q_s = basis.A.Q.double(), basis.S.Q.double()
    w = layer.weight.detach().double().flatten(1)  # (out, patch) in the factors' order
    bias = _bias(layer)
    if with_bias_coordinate:
        w, bias = torch.cat([w, bias.unsqueeze(1)], dim=1), None
    core = q_s.T @ w @ q_a
    rot = q_a.T
    in_bias = rot[:, -1] if with_bias_coordinate else None
    rot = rot[:, : layer.weight[0].numel()]
    like = layer.weight
    if isinstance(layer, nn.Conv2d):
        rot_in = conv_like(layer, layer.in_channels, len(rot), bias=in_bias is not None)
        rot_in = load_weights(rot_in, rot.reshape(len(rot), *layer.weight.shape[1:]), in_bias, like)
    else:
        rot_in = pointwise(layer, rot, in_bias, like)
    return KFEBottleneck(
        rot_in, pointwise(layer, core, None, like), pointwise(layer, q_s, bias, like)
    )
