"""Attention heads as the prunable units of attention projections (channel methods).

An output channel of a query/key/value projection is not a free unit: the attention splits
the projection's output *by position* into ``(heads, head_dim)``, so removing arbitrary
channels would move channels across heads (or break the reshape).  The smallest unit that
can be removed exactly is a whole head -- its query, key and value rows and the columns of
the output projection that read it; with grouped-query attention, a key/value head
together with the query heads that share it.  Removing a unit computes the same function
as zeroing it (the masked reference of :func:`~eigendamage.structure.mask_channels`): its
values are zero, so its contribution to the output projection vanishes whatever its
queries and keys, and the softmax scale (from ``head_dim``) is unchanged.

Adapters recognise attention modules by their attributes, not their classes:

* ``fused``: one ``qkv``/``c_attn`` Linear laid out ``(3, heads, head_dim)`` and an output
  projection ``proj``/``c_proj`` (timm ``Attention``; HF GPT-2 after its ``Conv1D`` became
  ``nn.Linear`` at load);
* ``separate``: ``query``/``key``/``value`` (HF BERT, RoBERTa: output projection
  ``<parent>.output.dense``), ``q_lin``/``k_lin``/``v_lin``/``out_lin`` (DistilBERT),
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (LLaMA-style, grouped-query aware).

After removal, :func:`refresh_head_counts` sets the head-count attributes the module's
``forward`` reads (e.g. timm ``num_heads``/``attn_dim``, GPT-2 ``split_size``); ``save_model``
records them (``architecture.json`` ``attributes``).  Attention that fits no adapter
(``nn.MultiheadAttention``, Swin's relative-position tables, timm ``scale_norm``) keeps its
projections whole: the groups through them are skipped with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (query, key, value, output) attribute names of the separate-projection layouts.
_SEPARATE = (
    ("query", "key", "value", None),
    ("q_lin", "k_lin", "v_lin", "out_lin"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
)
_FUSED = (("qkv", "proj"), ("c_attn", "c_proj"))
_HEAD_DIM = ("head_dim", "attention_head_size")
# Attributes a forward may read that depend on the number of heads kept: head counts, and
# widths (heads x head_dim).
_COUNTS = ("num_heads", "num_attention_heads", "n_heads")
_WIDTHS = ("attn_dim", "all_head_size", "split_size")
HEAD_ATTRIBUTES = _COUNTS + _WIDTHS


@dataclass(frozen=True)
class HeadLayout:
    """The removable units of one attention module and the rows/columns each one owns.

    ``rows``: ``(linear name, unit of each output row)``; ``cols``: ``(linear name, unit of
    each input column)``.
    """

    module: str
    units: int
    rows: tuple[tuple[str, torch.Tensor], ...]
    cols: tuple[tuple[str, torch.Tensor], ...]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.rows) + tuple(n for n, _ in self.cols)


def _linear(module: nn.Module, attr: str | None) -> nn.Linear | None:
    child = getattr(module, attr, None) if attr else None
    return child if type(child) is nn.Linear else None


def _head_dim(module: nn.Module) -> int | None:
    for attr in _HEAD_DIM:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _unit_of(width: int, head_dim: int, heads_per_unit: int = 1) -> torch.Tensor:
    return torch.arange(width) // head_dim // heads_per_unit


def _fused(name: str, module: nn.Module, d: int) -> HeadLayout | str | None:
    for qkv_attr, out_attr in _FUSED:
        qkv, out = _linear(module, qkv_attr), _linear(module, out_attr)
        if qkv is None or out is None:
            continue
        if getattr(module, "q_attn", None) is not None:
            return "cross-attention (separate q_attn) is not supported"
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return "a norm over all heads (scale_norm) couples the heads"
        if qkv.out_features % (3 * d) or out.in_features * 3 != qkv.out_features:
            return f"{qkv_attr} is not laid out (3, heads, {d})"
        heads = qkv.out_features // (3 * d)
        rows = [(f"{name}.{qkv_attr}", _unit_of(qkv.out_features, d) % heads)]
        gate = _linear(module, "gate")
        if gate is not None:
            rows.append((f"{name}.gate", _unit_of(gate.out_features, d)))
        cols = ((f"{name}.{out_attr}", _unit_of(out.in_features, d)),)
        return HeadLayout(name, heads, tuple(rows), cols)
    return None


def _separate(
    name: str, module: nn.Module, d: int, parent: tuple[str, nn.Module] | None
) -> HeadLayout | str | None:
    for q_attr, k_attr, v_attr, out_attr in _SEPARATE:
        q, k, v = (_linear(module, a) for a in (q_attr, k_attr, v_attr))
        if q is None or k is None or v is None:
            continue
        out_name, out = f"{name}.{out_attr}", _linear(module, out_attr)
        if out_attr is None and parent is not None:  # BERT: <parent>.output.dense
            out_name = f"{parent[0]}.output.dense"
            out = _linear(getattr(parent[1], "output", None), "dense")
        if out is None:
            return "no output projection found"
        if k.out_features != v.out_features or q.out_features != out.in_features:
            return "projection widths do not match"
        if q.out_features % d or k.out_features % d:
            return f"projection widths are not multiples of head_dim={d}"
        kv_heads = k.out_features // d
        group = q.out_features // d // kv_heads  # query heads per key/value head (GQA)
        if group * kv_heads * d != q.out_features:
            return "query heads are not a multiple of key/value heads"
        rows = (
            (f"{name}.{q_attr}", _unit_of(q.out_features, d, group)),
            (f"{name}.{k_attr}", _unit_of(k.out_features, d)),
            (f"{name}.{v_attr}", _unit_of(v.out_features, d)),
        )
        cols = ((out_name, _unit_of(out.in_features, d, group)),)
        return HeadLayout(name, kv_heads, rows, cols)
    return None


def _has_heads(module: nn.Module) -> bool:
    return any(hasattr(module, a) for a in _COUNTS)


def find_heads(model: nn.Module) -> tuple[list[HeadLayout], dict[str, str]]:
    """Head layouts of the model's attention modules, and ``{module: reason}`` for attention
    modules whose projections must stay whole."""
    layouts: list[HeadLayout] = []
    unsupported: dict[str, str] = {}
    parents: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = (name, module)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            unsupported[name] = "nn.MultiheadAttention keeps its packed projections whole"
            continue
        d = _head_dim(module)
        if d is None:
            if _has_heads(module):
                unsupported[name] = "attention without a head_dim attribute"
            continue
        found = _fused(name, module, d) or _separate(name, module, d, parents.get(name))
        if isinstance(found, HeadLayout):
            if found.units > 1:
                layouts.append(found)
        elif isinstance(found, str):
            unsupported[name] = found
        elif _has_heads(module):
            unsupported[name] = "no adapter for this attention layout"
    return layouts, unsupported


def refresh_head_counts(model: nn.Module, layouts: list[HeadLayout]) -> None:
    """Set each attention module's head-count attributes from its (pruned) projections."""
    for layout in layouts:
        module = model.get_submodule(layout.module)
        d = _head_dim(module)
        width = model.get_submodule(layout.cols[0][0]).in_features  # query heads x head_dim
        heads = width // d
        for attrs, value in ((_COUNTS, heads), (_WIDTHS, width)):
            for attr in attrs:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, value)
