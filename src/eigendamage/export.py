"""Export a (pruned) model for deployment: ONNX or a ``torch.export`` program (``.pt2``).

Why export at all: ``save_model`` files need eigendamage (and the model's library) to load;
an exported graph runs with onnxruntime or plain PyTorch alone.  Pruned models are made of
ordinary modules (KFE bottlenecks are 1x1 convs/Linear layers around a core), so both
exporters take them as they are.  The graph takes one input tensor -- images, or token
ids for ``hf:`` models -- with a dynamic batch dimension, and returns the logits (a HF
output object is reduced to its ``.logits``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .curvature.hooks import eval_mode, logits_of
from .errors import ConfigError, ModelError

FORMATS = ("onnx", "pt2")
# torch.export specialises a batch dimension of size 1; trace with 2 so it stays dynamic.
TRACE_BATCH = 2


class LogitsOnly(nn.Module):
    """``model`` with its output reduced to the logits tensor (one graph output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    *,
    fmt: str = "onnx",
    opset: int | None = None,
) -> Path:
    """Write ``model`` traced in eval mode on ``example`` to ``path`` in format ``fmt``.

    The batch dimension of ``example`` is exported as dynamic (trace with a batch of at
    least 2: a size-1 dimension is specialised).  Returns the path.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {fmt!r}")
    wrapped = LogitsOnly(model)
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch},)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with eval_mode(wrapped):
            _export(wrapped, out, example, fmt, dynamic, opset)
    except ImportError as exc:
        raise ModelError(
            f"{fmt} export needs the optional packages: pip install 'eigendamage[export]' ({exc})"
        ) from exc
    except Exception as exc:  # tracing failures come as many exception types
        first = " ".join(str(exc).split())[:400]
        raise ModelError(f"cannot export {type(model).__name__} to {fmt}: {first}") from exc
    return out


def _export(
    wrapped: nn.Module, out: Path, example: torch.Tensor, fmt: str, dynamic: Any, opset: int | None
) -> None:
    if fmt == "pt2":
        torch.export.save(torch.export.export(wrapped, (example,), dynamic_shapes=dynamic), out)
        return
    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        verbose=False,  # no progress lines on stdout
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=dynamic,
        opset_version=opset,
    )
    program.save(out)


def run_exported(path: str | os.PathLike[str], x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x``: onnxruntime for ``.onnx``, PyTorch for ``.pt2``."""
    p = Path(path)
    if p.suffix == ".pt2":
        program = torch.export.load(p)
        with torch.no_grad():
            return program.module()(x)
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(
            "checking an ONNX file needs onnxruntime: pip install onnxruntime"
        ) from exc
    session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    return torch.from_numpy(out)


def max_abs_diff(model: nn.Module, path: str | os.PathLike[str], x: torch.Tensor) -> float:
    """Largest absolute difference between the exported file and ``model`` on ``x``."""
    with eval_mode(model), torch.no_grad():
        reference = LogitsOnly(model)(x)
    return float((run_exported(path, x) - reference.cpu()).abs().max())


def trace_input(model: nn.Module, batch_size: int = TRACE_BATCH) -> Any:
    """The example input to trace ``model`` with, from its spec (images or token ids)."""
    from .models.registry import example_input

    return example_input(model, max(batch_size, TRACE_BATCH))
