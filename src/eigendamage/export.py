"""Export a (pruned) model for deployment: ONNX or a ``torch.export`` program (``.pt2``).

Why export at all: ``save_model`` files need eigendamage (and the model's library) to load;
an exported graph runs with onnxruntime or plain PyTorch alone.  Pruned models are made of
ordinary modules (KFE bottlenecks are 1x1 convs/Linear layers around a core), so both
exporters take them as they are.  The graph takes one input tensor -- images, or token
ids for ``hf:`` models -- with a dynamic batch dimension, and returns the logits (a HF
output object is reduced to its ``.logits``).  The file is written like every other output:
into a temp file next to it, then renamed over the path (a link there is replaced, never
followed), so a failed or killed export leaves the old file or none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelError
from .io.atomic import _atomic_target
from .modelcall import eval_mode, logits_of

FORMATS = ("onnx", "pt2")
# torch.onnx's own threshold: initializers above it go to an external data file.
ONNX_EXTERNAL_DATA_BYTES = 1_610_612_736
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
    try:
        with eval_mode(wrapped), _atomic_target(out) as tmp:
            _export(wrapped, tmp, out.name, example, fmt, dynamic, opset)
    except ImportError as exc:
        raise ModelError(
            f"{fmt} export needs the optional packages: pip install 'eigendamage[export]' ({exc})"
        ) from exc
    except Exception as exc:  # tracing failures come as many exception types
        first = " ".join(str(exc).split())[:400]
        raise ModelError(f"cannot export {type(model).__name__} to {fmt}: {first}") from exc
    return out


def _export(
    wrapped: nn.Module,
    tmp: Path,
    name: str,
    example: torch.Tensor,
    fmt: str,
    dynamic: Any,
    opset: int | None,
) -> None:
    """Write the export to ``tmp``, the temp file that becomes ``name`` once complete."""
    if fmt == "pt2":
        program = torch.export.export(wrapped, (example,), dynamic_shapes=dynamic)
        # A file object: given a path, torch.export complains about any name but *.pt2.
        with open(tmp, "xb") as f:
            torch.export.save(program, f)
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
    graph = program.model.graph
    size = sum(
        v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None
    )
    if size <= ONNX_EXTERNAL_DATA_BYTES:
        program.save(tmp)
        return
    # Too large for one protobuf: the weights go to NAME.data, referenced by that name (not
    # the temp file's), so the reference holds once the temp file is renamed to NAME.
    import onnx_ir

    onnx_ir.save(program.model, tmp, format="protobuf", external_data=f"{name}.data")


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
