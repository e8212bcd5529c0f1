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
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ..curvature.factors import KFE
from ..errors import ModelError

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
            f"core {tuple(f.core.shape[:2])}: were the factors collected in channel mode "
            "without the bias coordinate?"
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
    core_mod = _core_like(f.template, core, core_bias, like)
    rot_out = nn.Identity() if p_out is None else pointwise(f.template, p_out, f.bias, like)
    if form == "dense":
        return core_mod
    return KFEBottleneck(rot_in, core_mod, rot_out)


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


def _core_like(
    template: nn.Module, core: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
) -> nn.Module:
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


def layer_path(core_name: str, model: nn.Module) -> str:
    """Path of the module to replace for a target core (its bottleneck, if it has one)."""
    parent_name, _, child = core_name.rpartition(".")
    if child == "core" and isinstance(model.get_submodule(parent_name), KFEBottleneck):
        return parent_name
    return core_name


def to_eigenbasis(model: nn.Module, kfe: dict[str, KFE]) -> nn.Module:
    """A copy of ``model`` with every layer in ``kfe`` as a full KFE bottleneck.

    Keys of ``kfe`` name the layers (or bottleneck cores) the eigenbases belong to; the
    eigenbases must be those of the channel-mode A (no bias coordinate) and S.  The copy
    computes the same function up to float round-off; ``model`` is not modified.
    """
    new = copy.deepcopy(model)
    for core_name, basis in kfe.items():
        path = layer_path(core_name, new)
        layer = in_eigenbasis(to_factored(new.get_submodule(path)), basis)
        set_submodule(new, path, build_form(layer, "full"))
    return new
