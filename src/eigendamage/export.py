"""Export a (pruned) model for deployment: ONNX or a ``torch.export`` program (``.pt2``).

Why export at all: ``save_model`` files need eigendamage (and the model's library) to load;
an exported graph runs with onnxruntime or plain PyTorch alone.  Pruned models are made of
ordinary modules (KFE bottlenecks are 1x1 convs/Linear layers around a core), so both
exporters take them as they are.  The graph takes one input tensor -- images, or token
ids for ``hf:`` models -- with a dynamic batch dimension, and returns the logits (a HF
output object is reduced to its ``.logits``).  The file is written like every other output:
into a temp file next to it, then renamed over the path (a link there is replaced, never
followed), so a failed or killed export leaves the old file or none.  The format is the
one the file's extension names.  :func:`fold_for_export` may first rebuild the bottlenecks
in other exact forms: by parameter count (deterministic, never larger), by timing on this
machine (explicit, may be much larger), or as a recorded choice (replayed exactly).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelError
from .io.atomic import _atomic_target
from .modelcall import eval_mode, logits_of
from .surgery import eigenbasis

FORMATS = ("onnx", "pt2")
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2"}
# How bottlenecks are rebuilt before export: "none" keeps the pruned model's forms.
FOLDS = ("none", "params", "latency")
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
    fmt: str | None = None,
    opset: int | None = None,
) -> Path:
    """Write ``model`` traced in eval mode on ``example`` to ``path`` in format ``fmt``.

    The batch dimension of ``example`` is exported as dynamic (trace with a batch of at
    least 2: a size-1 dimension is specialised).  ``fmt`` defaults to the one ``path``'s
    extension names (:func:`format_for`).  Returns the path.
    """
    fmt = format_for(path, fmt)
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


def format_for(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The export format of ``path``: the one its extension names, which ``fmt`` must match.

    Why: a file named ``.tflite`` or ``.bin`` holding ONNX misleads whoever loads it.

    Raises:
        ConfigError: ``fmt`` is no format, the extension names none, or names another one.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {fmt!r}")
    suffix = Path(path).suffix
    named = SUFFIXES.get(suffix.lower())
    if named is None:
        what = f"a {suffix} file" if suffix else "a file without extension"
        raise ConfigError(
            f"{path}: cannot export to {what}; name it .onnx (ONNX) or .pt2 (torch.export)"
        )
    if fmt is not None and fmt != named:
        raise ConfigError(f"{path}: a {suffix} file holds {named}, not {fmt}; name it .{fmt}")
    return named


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


@dataclass(frozen=True)
class Folded:
    """A model with its bottlenecks rebuilt for export, and what changed.

    ``forms`` is the form of every bottleneck afterwards (``dense``: one plain layer);
    ``changed`` maps the layers whose form changed to ``(before, after)``; the parameter
    counts are the whole model's before and after.
    """

    model: nn.Module
    forms: dict[str, eigenbasis.Form]
    changed: dict[str, tuple[eigenbasis.Form, eigenbasis.Form]]
    params_before: int
    params_after: int


def fold_for_export(
    model: nn.Module,
    how: str | Mapping[str, str] = "params",
    example: Any = None,
) -> Folded:
    """A copy of ``model`` with each EigenDamage bottleneck rebuilt as ``how`` says.

    All exact forms compute the same function; they differ in size and speed.

    Args:
        model: a (pruned) model; it is not modified.
        how: ``"none"`` keeps every form; ``"params"`` picks each bottleneck's form with
            the fewest parameters (deterministic, never larger; the current form wins
            ties); ``"latency"`` times every form on ``example`` here
            (:func:`~eigendamage.surgery.fold.fold_for_speed`: the fastest may be far larger,
            and the choice varies between machines and runs); a mapping ``{layer: form}``
            (``Folded.forms`` of an earlier call) replays that choice exactly.
        example: the batch timed by ``"latency"``.

    Returns:
        The :class:`Folded` model and the forms chosen.

    Raises:
        ConfigError: an unknown ``how``, a layer or form of the mapping this model lacks.
    """
    before = _forms_of(model)
    if isinstance(how, Mapping):
        new = _apply_forms(model, how)
    elif how == "latency":
        if example is None:
            raise ConfigError("fold 'latency' times the layers: pass an example input")
        from .surgery.fold import fold_for_speed

        new, _ = fold_for_speed(model, example)
    elif how == "params":
        new = _apply_forms(model, _smallest_forms(model))
    elif how == "none":
        new = model
    else:
        raise ConfigError(f"fold must be one of {FOLDS} or a {{layer: form}} mapping, got {how!r}")
    forms = {name: _form_at(new, name) for name in before}
    return Folded(
        model=new,
        forms=forms,
        changed={n: (before[n], f) for n, f in forms.items() if f != before[n]},
        params_before=_params(model),
        params_after=_params(new),
    )


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _form(f: eigenbasis.Factored) -> eigenbasis.Form:
    """The form ``f`` is in: which rotations it still has."""
    return {(True, True): "full", (True, False): "fold_out", (False, True): "fold_in"}.get(
        (f.p_in is not None, f.p_out is not None), "dense"
    )


def _possible(f: eigenbasis.Factored) -> list[eigenbasis.Form]:
    """The forms ``f`` can be built in: folding is one-way, a folded rotation is gone."""
    have_in, have_out = f.p_in is not None, f.p_out is not None
    ok = {"full": have_in and have_out, "fold_out": have_in, "fold_in": have_out, "dense": True}
    return [form for form in eigenbasis.FORMS if ok[form]]


def _forms_of(model: nn.Module) -> dict[str, eigenbasis.Form]:
    names = [n for n, m in model.named_modules() if _foldable(m)]
    return {name: _form_at(model, name) for name in names}


def _foldable(module: nn.Module) -> bool:
    """A bottleneck with forms to choose from: patch-mode and bias-coordinate ones (from
    ``to_eigenbasis`` on default factors) have only the one they are in."""
    return isinstance(module, eigenbasis.KFEBottleneck) and eigenbasis.is_channel_form(module)


def _form_at(model: nn.Module, name: str) -> eigenbasis.Form:
    module = model.get_submodule(name)
    return (
        _form(eigenbasis.to_factored(module))
        if isinstance(module, eigenbasis.KFEBottleneck)
        else "dense"
    )


def _smallest_forms(model: nn.Module) -> dict[str, eigenbasis.Form]:
    chosen: dict[str, eigenbasis.Form] = {}
    for name, module in model.named_modules():
        if _foldable(module):
            f = eigenbasis.to_factored(module)
            current = _form(f)
            best = min(_possible(f), key=lambda form: eigenbasis.form_params(f, form))
            if eigenbasis.form_params(f, best) < eigenbasis.form_params(f, current):
                chosen[name] = best
    return chosen


def _apply_forms(model: nn.Module, forms: Mapping[str, str]) -> nn.Module:
    """A copy of ``model`` with the named bottlenecks rebuilt in the given forms."""
    new = copy.deepcopy(model)
    for name, form in forms.items():
        try:
            module = new.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"fold: the model has no layer {name!r}") from None
        f = eigenbasis.to_factored(module) if isinstance(module, eigenbasis.KFEBottleneck) else None
        possible = _possible(f) if f is not None else ["dense"]
        if form not in possible:
            raise ConfigError(
                f"fold: layer {name!r} cannot be built as {form!r} (possible: {possible}); "
                "give the forms recorded for this model"
            )
        if f is not None and form != _form(f):
            eigenbasis.set_submodule(
                new, name, eigenbasis.build_form(f, form).train(module.training)
            )
    return new
