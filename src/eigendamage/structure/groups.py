"""Coupled channel groups: which output channels must be removed together.

Removing output channel ``c`` of a conv also removes channel ``c`` of the BatchNorm after it
and input channel ``c`` of every consumer; across a residual stage the convs feeding one
addition share their channels, a concat shifts indices, a flatten expands one channel into
``h*w`` Linear inputs and a depthwise conv ties its channels to its input's producer.  The
graph tracing and index bookkeeping come from torch-pruning's ``DependencyGraph``; here its
groups become plain data (module *names* and index tensors), so groups survive ``deepcopy``
and the removal itself (:mod:`eigendamage.surgery.channels`) needs no graph.

Where torch-pruning falls short, and what is done about it:

* ``build_dependency`` puts the traced model into ``eval()`` mode; we trace a deepcopy.
* Grouped convs other than depthwise (``groups == in == out``) are pruned wrongly by
  torch-pruning (``prune_in_channels`` truncates the kept list per group); every group
  touching one is skipped (:attr:`ChannelGroups.skipped`) rather than pruned incorrectly.
* Members it cannot see as modules (unwrapped ``nn.Parameter`` s, custom ops, LayerNorm /
  GroupNorm, whose removal we do not verify) make their group skipped, likewise.
* It has no notion of "the output layer"; we walk back from the graph's sinks to find the
  Conv/Linear producing each model output and never prune its outputs (class logits).
* Attention projections: their channels are positions inside heads.  Groups that would
  remove query/key/value rows or output-projection columns are skipped, and each attention
  module an adapter recognises gets one group of its own whose channels are whole heads
  (:mod:`eigendamage.structure.heads`).
* Models returning HF-style outputs are traced through their logits.  Groups touching a
  tied parameter are skipped: pruning would untie it (:mod:`eigendamage.structure.ties`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ModelError
from ..modelcall import logits_of
from ..surgery.channels import Dim, Plan, remove_channels_, zero_channels_
from .heads import HeadLayout, find_heads, refresh_head_counts
from .ties import tied_layers

_ROOT_TYPES = (nn.Conv2d, nn.Linear)
_MEMBER_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
LayerKind = Literal["conv", "depthwise", "linear", "bn"]


@dataclass(frozen=True)
class Member:
    """One module touched by a group: ``index[k]`` (along ``dim``) is group channel
    ``channel[k]``; several indices can map to one channel (a flatten before a Linear)."""

    module: str
    dim: Dim
    kind: LayerKind
    index: torch.Tensor
    channel: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that can only be removed together, ``size`` of them."""

    id: str
    size: int
    members: tuple[Member, ...]

    @property
    def roots(self) -> tuple[Member, ...]:
        """Conv/Linear members whose *output* channels are removed: the ones to score."""
        return tuple(
            m for m in self.members if m.dim == "out" and m.kind in ("conv", "depthwise", "linear")
        )


# What torch-pruning raises on graphs it cannot follow (ShuffleNet: ZeroDivisionError).
_TRACE_ERRORS = (RuntimeError, TypeError, AttributeError, ValueError, IndexError, ArithmeticError)
# Warned when its channel-count inference gives up (torchvision Swin-T, Swin V2): the groups
# built on the guessed counts then expand indices without bound until memory runs out.
_GAVE_UP = "Maximum recursive depth reached"


def _untraceable(model_name: str, why: str) -> ModelError:
    return ModelError(
        f"cannot trace the channel dependencies of {model_name} (torch-pruning: {why}); "
        "prune it with method='eigendamage', which needs no dependency graph"
    )


@contextlib.contextmanager
def _bounded_index_expansion(limit: int, model_name: str) -> Iterator[None]:
    """Make torch-pruning's flatten index mapping refuse to grow past ``limit`` indices.

    Why: through torchvision Swin V2's window reshapes it expands channel indices again and
    again (x32 each time) until the OOM killer ends the process without a message.  The
    patch lives only inside this block.
    """
    from torch_pruning.dependency import index_mapping

    mapping = index_mapping._FlattenIndexMapping
    original = mapping.__call__

    def bounded(self: Any, idxs: Any) -> Any:
        if not self.reverse and len(idxs) * self._stride > limit:  # check before expanding
            why = f"its channel indices grew past {limit:,} through a reshape"
            raise _untraceable(model_name, why)
        return original(self, idxs)

    mapping.__call__ = bounded
    try:
        yield
    finally:
        mapping.__call__ = original


def _dependency_graph(traced: nn.Module, example_inputs: Any, model_name: str) -> Any:
    """torch-pruning's dependency graph of ``traced``, or a :class:`ModelError` that says
    why it cannot be had and what to use instead."""
    with torch.enable_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dg = tp.DependencyGraph().build_dependency(
                traced,
                example_inputs=example_inputs,
                forward_fn=trace_forward,
                output_transform=logits_of,
                verbose=False,
            )
        except _TRACE_ERRORS as exc:
            raise _untraceable(model_name, f"{type(exc).__name__}: {exc}") from exc
    for w in caught:
        if _GAVE_UP in str(w.message):
            raise _untraceable(model_name, "it could not infer the channel counts of a reshape")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return dg


@dataclass
class ChannelGroups:
    """All prunable coupled channel groups of a model (see the module docstring)."""

    groups: list[ChannelGroup]
    ignored: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # group id -> reason
    heads: list[HeadLayout] = field(default_factory=list)  # attention modules pruned by head

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: Any,
        ignored_layers: Iterable[str] | None = None,
    ) -> ChannelGroups:
        """Trace ``model`` (a deepcopy; the model is untouched) on ``example_inputs``.

        The layers producing the model's outputs are always ignored (their output channels
        are never removed); ``ignored_layers`` adds more (names from ``named_modules()``).
        """
        traced = copy.deepcopy(model)
        for p in traced.parameters():
            p.requires_grad_(True)
        dg = _dependency_graph(traced, example_inputs, type(model).__name__)
        by_name = dict(traced.named_modules())
        names = {m: n for n, m in by_name.items()}
        extra = tuple(ignored_layers or ())
        unknown = [n for n in extra if n not in by_name]
        if unknown:
            raise ModelError(f"ignored_layers names not in the model: {unknown}")
        ignored = tuple(dict.fromkeys(_output_layers(dg, names) + extra))
        layouts, unsupported = find_heads(traced)
        layouts = [h for h in layouts if not set(h.layers) & set(ignored)]
        protected = _protected_attention_dims(traced, layouts, unsupported)
        # Attention projections are never roots: their groups are not wanted, and tracing
        # them through rotary embeddings can take torch-pruning combinatorially long.
        not_roots = list(ignored) + [n for n, dim in protected if dim == "out"]
        groups, skipped = [], {}
        limit = max(p.numel() for p in traced.parameters())  # no real index set is larger
        with _bounded_index_expansion(limit, type(model).__name__):
            all_groups = list(
                dg.get_all_groups(
                    ignored_layers=[by_name[n] for n in dict.fromkeys(not_roots)],
                    root_module_types=_ROOT_TYPES,
                )
            )
        tied = tied_layers(traced)
        candidates = [(*_convert(dg, g, names), True) for g in all_groups]
        candidates += [(_head_group(h), "", False) for h in layouts]  # heads: never protected
        for group, reason, may_hit in candidates:
            hit = next((m for m in group.members if (m.module, m.dim) in protected), None)
            if may_hit and hit is not None and not reason:
                reason = protected[(hit.module, hit.dim)]
            tie = next((tied[m.module] for m in group.members if m.module in tied), None)
            reason = reason or (tie and f"tied parameters {tie}: pruning would untie them")
            if reason:
                skipped[group.id] = reason
            else:
                groups.append(group)
        order = {n: i for i, n in enumerate(by_name)}
        groups.sort(key=lambda g: order[g.id])  # model order, not tracing order
        return cls(groups, ignored, skipped, layouts)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, group_id: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(f"no prunable channel group {group_id!r}")

    def root_layers(self) -> list[str]:
        """Names of all Conv/Linear layers whose output channels some group removes."""
        return list(dict.fromkeys(m.module for g in self for m in g.roots))

    def norm_layers(self) -> list[str]:
        """Names of all BatchNorm layers inside prunable groups."""
        return list(dict.fromkeys(m.module for g in self for m in g.members if m.kind == "bn"))

    def group_scores(self, layer_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per group channel: the SUM of the scores of its out-dim members of that channel.

        Summing is right for Delta L scores: removing a residual-stage channel removes that
        output channel of every conv feeding the stage, and (to the quadratic model's
        block-diagonal-across-layers accuracy) the loss increases add.  Groups with no
        scored member (e.g. no BatchNorm for slimming) are left out: they are not pruned.
        """
        out: dict[str, torch.Tensor] = {}
        for g in self:
            total = torch.zeros(g.size, dtype=torch.float64)
            scored = False
            for m in g.members:
                if m.dim == "out" and m.module in layer_scores:
                    s = layer_scores[m.module].detach().to("cpu", torch.float64)
                    total.index_add_(0, m.channel, s[m.index])
                    scored = True
            if scored:
                out[g.id] = total
        return out

    def removal_plan(self, keep: Mapping[str, torch.Tensor]) -> Plan:
        """``{(module, dim): removed indices}`` for keeping ``keep[group_id]`` channels.

        Groups not in ``keep`` stay whole.  Depthwise convs are recorded once, as "out".
        """
        plan: dict[tuple[str, Dim], set[int]] = {}
        ids = {g.id for g in self}
        for gid, kept in keep.items():
            if gid not in ids:
                raise ModelError(f"no prunable channel group {gid!r}; groups: {sorted(ids)}")
            g = self[gid]
            kept = torch.as_tensor(kept, dtype=torch.long).flatten()
            if kept.numel() == 0:
                raise ModelError(f"group {gid!r}: keep at least one channel")
            if kept.min() < 0 or kept.max() >= g.size:
                raise ModelError(f"group {gid!r}: kept channel indices must be in [0, {g.size})")
            removed = torch.ones(g.size, dtype=torch.bool)
            removed[kept] = False
            for m in g.members:
                dim: Dim = "out" if m.kind == "depthwise" else m.dim
                idx = m.index[removed[m.channel]]
                plan.setdefault((m.module, dim), set()).update(idx.tolist())
        return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in plan.items() if v}


def prune_channels(
    model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A NEW model with all channels not in ``keep`` physically removed (no masks, no hooks)."""
    pruned = remove_channels_(copy.deepcopy(model), groups.removal_plan(keep))
    refresh_head_counts(pruned, groups.heads)
    return pruned


def mask_channels(
    model: nn.Module, groups: ChannelGroups, keep: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A deepcopy whose removed channels output exactly zero: the reference of the pruned model.

    Zeroing the producers' weights and biases and the BatchNorm weight AND bias makes each
    removed channel identically 0 after BN, so consumers see the same inputs as in the
    physically pruned model and, in eval mode, both compute the same function.
    """
    return zero_channels_(copy.deepcopy(model), groups.removal_plan(keep))


def trace_forward(model: nn.Module, inputs: Any) -> Any:
    """The model's forward for tracing; HF models without their key/value cache (its
    concatenations are not part of the network and confuse the tracer)."""
    config = getattr(model, "config", None)
    kwargs = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    if isinstance(inputs, dict):
        return model(**inputs, **kwargs)
    if isinstance(inputs, tuple | list):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def _head_group(layout: HeadLayout) -> ChannelGroup:
    """One group per attention module: its channels are the removable head units."""
    members = [
        Member(name, dim, "linear", torch.arange(len(unit)), unit)
        for dim, pairs in (("out", layout.rows), ("in", layout.cols))
        for name, unit in pairs
    ]
    return ChannelGroup(layout.module, layout.units, tuple(members))


def _protected_attention_dims(
    model: nn.Module, layouts: list[HeadLayout], unsupported: dict[str, str]
) -> dict[tuple[str, Dim], str]:
    """``{(layer, dim): reason}``: dims of attention projections no channel group may cut."""
    protected: dict[tuple[str, Dim], str] = {}
    for h in layouts:
        reason = f"attention projections of {h.module!r} are pruned as whole heads"
        protected.update({(n, "out"): reason for n, _ in h.rows})
        protected.update({(n, "in"): reason for n, _ in h.cols})
    for name, why in unsupported.items():
        reason = f"attention {name!r} keeps its heads whole: {why}"
        for child, m in model.get_submodule(name).named_children():
            if isinstance(m, nn.Linear):
                path = f"{name}.{child}" if name else child
                protected.update({(path, "out"): reason, (path, "in"): reason})
    return protected


def _output_layers(dg: tp.DependencyGraph, names: dict[nn.Module, str]) -> tuple[str, ...]:
    """Conv/Linear layers whose outputs reach a model output without another weight layer."""
    stack = [n for n in dg.module2node.values() if not n.outputs]
    seen, found = set(), []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, _ROOT_TYPES):
            found.append(names[node.module])
        else:
            stack.extend(node.inputs)
    return tuple(sorted(found))


def _reads_untraced_tensor(node: Any) -> bool:
    """An elementwise op (e.g. a residual add) one of whose operands is a tensor outside the
    traced graph -- the model input or a buffer -- whose channels cannot be removed, so the
    channels coupled through that op cannot be removed either.  torch-pruning drops such
    operands from its graph silently; autograd still lists them as ``None``."""
    if node.type != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
        return False
    operands = getattr(node.grad_fn, "next_functions", ())
    return len(operands) > 1 and any(fn is None for fn, _ in operands)


def _kind(module: nn.Module) -> LayerKind:
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups == module.in_channels == module.out_channels > 1
        return "depthwise" if depthwise else "conv"
    return "linear" if isinstance(module, nn.Linear) else "bn"


def _convert(
    dg: tp.DependencyGraph, group: tp.Group, names: dict[nn.Module, str]
) -> tuple[ChannelGroup, str]:
    """torch-pruning group -> :class:`ChannelGroup`, plus why it cannot be pruned ("" if it can)."""
    root = group[0].dep.target.module
    gid = names[root]
    size = dg.get_out_channels(root)
    members, reason = [], ""
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter) or (
            module in names and not isinstance(module, _MEMBER_TYPES)
        ):
            reason = reason or f"unsupported member {names.get(module, 'parameter')!r}"
            continue
        if module not in names:  # torch-pruning's own ops (add, concat, reshape, ...)
            if _reads_untraced_tensor(item.dep.target):
                reason = reason or "coupled to the model input or a buffer by an elementwise op"
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1 and _kind(module) != "depthwise":
            reason = reason or f"grouped conv {names[module]!r} (groups={module.groups})"
        dim: Dim = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        members.append(
            Member(
                module=names[module],
                dim=dim,
                kind=_kind(module),
                index=torch.as_tensor(item.idxs, dtype=torch.long),
                channel=torch.as_tensor(item.root_idxs, dtype=torch.long),
            )
        )
    return ChannelGroup(gid, size, tuple(members)), reason
