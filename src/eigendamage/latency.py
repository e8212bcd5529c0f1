"""Measured speed-up of a pruned model over its original, next to the FLOPs reduction.

Why a separate comparison and not two :func:`~eigendamage.measure.measure_latency` calls:
on a shared or throttling machine the speed drifts over seconds, and timing one model
after the other turns drift into a fake speed-up.  Here the models take turns: ``rounds``
alternating measurements of ``repeats`` runs each, and the median over rounds of each
round's median is reported.  Denormal floats are flushed while timing
(:func:`~eigendamage.surgery.fold.flush_denormals`): random-weight models otherwise spend
most of their time in slow denormal arithmetic, differently for each model.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelError
from .measure import Counts, count, measure_latency
from .modelcall import model_device
from .models.registry import SPEC_ATTR, example_input
from .surgery.fold import flush_denormals


@dataclass(frozen=True)
class LatencyComparison:
    """One batch size: median latencies (ms) of each model and ratios to the baseline.

    ``speedup`` is the baseline's ms over each model's; the reductions are the fractions of
    the baseline's FLOPs and parameters removed; ``forms`` counts, per folded entry, the
    exact forms :func:`~eigendamage.surgery.fold.fold_for_speed` chose.
    """

    batch_size: int
    device: str
    threads: int
    ms: dict[str, float]
    speedup: dict[str, float]
    flops_reduction: dict[str, float]
    params_reduction: dict[str, float]
    forms: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TokenIds(nn.Module):
    """Feeds a token model from ``measure_latency``'s float probe input: ids ``|x| * V mod V``.

    The conversion is the same cheap element-wise op for every model compared, so ratios
    are unaffected; it exists because an embedding refuses float input.
    """

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    def forward(self, x: torch.Tensor) -> Any:
        ids = (x.abs() * self.vocab_size).long() % self.vocab_size
        return self.model(ids)


def timeable(model: nn.Module) -> nn.Module:
    """``model``, or an adapter that lets ``measure_latency`` drive a token model."""
    spec = getattr(model, SPEC_ATTR, None) or {}
    if spec.get("input_kind") == "tokens":
        return _TokenIds(model, int(spec["vocab_size"]))
    return model


def _probe(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A random input of ``shape``: token ids for token models, a float tensor otherwise."""
    spec = getattr(model, SPEC_ATTR, None) or {}
    gen = torch.Generator().manual_seed(0)
    if spec.get("input_kind") == "tokens":
        return torch.randint(0, int(spec["vocab_size"]), shape, generator=gen)
    return torch.randn(shape, generator=gen)


def input_shape_of(model: nn.Module) -> tuple[int, ...]:
    """The per-example input shape (batch 1) recorded in the model's spec (or ONNX graph)."""
    if isinstance(model, OnnxModel):
        return model.input_shape()
    return tuple(example_input(model, 1).shape)


# ONNX element types counted as weights: float, float16, double, bfloat16.
_ONNX_FLOATS = {1, 10, 11, 16}
_ONNX_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime on CPU, called like a model so it is timed like one.

    Why: the exported graph is what a deployment runs; timing it next to the PyTorch models
    (alternating, like them) shows what the export itself gains or loses.  Integer (token
    id) inputs get ids 0/1 from the float probe: the ids' values do not change the time.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(
                f"timing {path} needs onnxruntime: pip install 'eigendamage[export]'"
            ) from exc
        self.path = Path(path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            first = " ".join(str(exc).split())[:300]
            raise ModelError(f"cannot load {path} with onnxruntime: {first}") from exc
        self.input = self.session.get_inputs()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "int" in self.input.type:
            x = x.abs().long() % 2
        (out, *_) = self.session.run(None, {self.input.name: x.cpu().numpy()})
        return torch.from_numpy(out)

    def input_shape(self) -> tuple[int, ...]:
        """The graph's input shape at batch 1; its other dimensions must be fixed."""
        dims = self.input.shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise ConfigError(
                f"{self.path}: input shape {self.input.shape} has free dimensions; "
                "give one example's shape (--input-size)"
            )
        return (1, *dims)

    def counts(self, shape: Sequence[int]) -> Counts:
        """Parameters (float initializers) and MACs of Conv/Gemm/MatMul with a weight.

        The MACs follow :mod:`eigendamage.measure`'s rules, with shapes from one run on an
        input of ``shape``.  Parameters are the graph's: the exporter folds BatchNorm into
        the convs, so they can differ slightly from the PyTorch model's count.
        """
        import onnx
        import onnxruntime as ort

        graph_model = onnx.load(str(self.path))
        graph = graph_model.graph
        weights = {t.name: tuple(t.dims) for t in graph.initializer if t.data_type in _ONNX_FLOATS}
        nodes = [
            n
            for n in graph.node
            if n.op_type in _ONNX_WEIGHT_OPS and any(i in weights for i in n.input[:2])
        ]
        wanted = {n.output[0] for n in nodes} | {n.input[0] for n in nodes}
        shown = {o.name for o in graph.output}
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(wanted - shown))
        session = ort.InferenceSession(
            graph_model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, {self.input.name: self.forward_input(shape)})
        sizes = {name: value.size for name, value in zip(names, values, strict=True)}
        flops = sum(_node_macs(n, weights, sizes) for n in nodes)
        return Counts(params=sum(math.prod(d) for d in weights.values()), flops=flops)

    def forward_input(self, shape: Sequence[int]) -> Any:
        """The numpy input :meth:`forward` would pass for a probe of ``shape``."""
        probe = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
        return (probe.abs().long() % 2 if "int" in self.input.type else probe).numpy()


def _node_macs(node: Any, weights: dict[str, tuple[int, ...]], sizes: dict[str, int]) -> int:
    """MACs of one ONNX node (its weight is an initializer), as :mod:`.measure` counts them."""
    attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
    first, second = node.input[0], node.input[1]
    out = sizes[node.output[0]]
    if node.op_type == "Conv":
        return out * math.prod(weights[second][1:])
    if node.op_type == "ConvTranspose":
        return sizes[first] * math.prod(weights[second][1:])
    if node.op_type == "Gemm":
        if second in weights:
            w = weights[second]
            return out * (w[1] if attrs.get("transB") else w[0])
        w = weights[first]
        return out * (w[0] if attrs.get("transA") else w[1])
    if second in weights:  # MatMul: x @ W
        return out * weights[second][-2]
    return out * weights[first][-1]  # W @ x


def _check_onnx_device(models: dict[str, nn.Module], device: str | torch.device) -> None:
    onnx = [name for name, model in models.items() if isinstance(model, OnnxModel)]
    if onnx and not str(device).startswith("cpu"):
        raise ConfigError(f"ONNX files are timed on the CPU only ({onnx[0]}); use device cpu")


def _counts(model: nn.Module, shape: tuple[int, ...]) -> Counts:
    """Parameters and MACs at batch 1 of a PyTorch model or an :class:`OnnxModel`."""
    if isinstance(model, OnnxModel):
        return model.counts(shape)
    return count(model, example_inputs=_probe(model, shape).to(model_device(model)))


def compare_latency(
    models: dict[str, nn.Module],
    *,
    baseline: str,
    input_shape: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 3,
) -> list[LatencyComparison]:
    """Time every model in ``models`` at each batch size, alternating between them.

    ``baseline`` names the entry the speed-ups and reductions are relative to (speed-up =
    baseline ms / model ms).  ``input_shape`` is one example's input with a leading batch
    dimension of 1 (default: from the baseline's spec).  FLOPs are counted at batch 1 with
    :func:`~eigendamage.measure.count` on a real example input (token ids for HF models).
    An :class:`OnnxModel` entry is timed the same way with onnxruntime (CPU only) and
    counted from its graph (:meth:`OnnxModel.counts`).
    """
    if baseline not in models:
        raise ConfigError(f"baseline {baseline!r} is not among the models {sorted(models)}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    _check_onnx_device(models, device)
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(models[baseline])
    counts = {name: _counts(model, shape) for name, model in models.items()}
    base = counts[baseline]
    timed = {name: timeable(model) for name, model in models.items()}
    rows = []
    for batch_size in batch_sizes:
        medians: dict[str, list[float]] = {name: [] for name in models}
        result = None
        for _ in range(rounds):
            for name, model in timed.items():
                with flush_denormals():
                    result = measure_latency(
                        model,
                        shape,
                        batch_size=batch_size,
                        device=device,
                        threads=threads,
                        warmup=warmup,
                        repeats=repeats,
                    )
                medians[name].append(result.median_ms)
        ms = {name: statistics.median(values) for name, values in medians.items()}
        rows.append(
            LatencyComparison(
                batch_size=batch_size,
                device=result.device,
                threads=result.threads,
                ms=ms,
                speedup={name: ms[baseline] / ms[name] for name in models},
                flops_reduction={n: 1 - c.flops / base.flops for n, c in counts.items()},
                params_reduction={n: 1 - c.params / base.params for n, c in counts.items()},
            )
        )
    return rows


def run_latency_bench(
    models: dict[str, nn.Module],
    *,
    baseline: str,
    input_shape: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    fold: bool = True,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    **timing: Any,
) -> list[LatencyComparison]:
    """:func:`compare_latency` per batch size, plus ``"<name> (folded)"`` entries: each model
    with EigenDamage bottlenecks rebuilt in its fastest exact form for that batch size
    (:func:`~eigendamage.surgery.fold.fold_for_speed`; ``fold=False`` skips them).
    ``timing`` goes to :func:`compare_latency` (``warmup``, ``repeats``, ``rounds``)."""
    from .surgery.eigenbasis import KFEBottleneck
    from .surgery.fold import fold_for_speed

    _check_onnx_device(models, device)
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(models[baseline])
    rows = []
    for batch_size in batch_sizes:
        entries, forms = dict(models), {}
        for name, model in models.items():
            if fold and any(isinstance(m, KFEBottleneck) for m in model.modules()):
                probe = _probe(model, (batch_size, *shape[1:])).to(device)
                folded, chosen = fold_for_speed(
                    copy.deepcopy(model).to(device), probe, threads=threads
                )
                entries[f"{name} (folded)"] = folded
                forms[f"{name} (folded)"] = dict(Counter(chosen.values()))
        (row,) = compare_latency(
            entries,
            baseline=baseline,
            input_shape=shape,
            batch_sizes=[batch_size],
            device=device,
            threads=threads,
            **timing,
        )
        rows.append(replace(row, forms=forms))
    return rows


def latency_table(rows: Sequence[LatencyComparison]) -> str:
    """Markdown: one line per (batch size, model) with ms, speed-up and reductions."""
    lines = [
        "| batch | model | median ms | speed-up | FLOPs removed | params removed |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for name, ms in row.ms.items():
            note = ""
            if name in row.forms:
                note = (
                    " [" + ", ".join(f"{k} {v}" for k, v in sorted(row.forms[name].items())) + "]"
                )
            lines.append(
                f"| {row.batch_size} | {name}{note} | {ms:.2f} | {row.speedup[name]:.2f}x "
                f"| {row.flops_reduction[name]:.1%} | {row.params_reduction[name]:.1%} |"
            )
    device = f"{rows[0].device}, {rows[0].threads} thread(s)" if rows else ""
    return "\n".join([f"# latency on {device}", *lines])
