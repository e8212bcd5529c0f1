"""`eigendamage export` commands (registered on the main typer app)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from .app import app, friendly_errors, log


@app.command("export")
@friendly_errors
def export_cmd(
    model: str = typer.Argument(..., help="model directory (from save_model) or model name"),
    out: Path = typer.Argument(..., help="file to write (.onnx or .pt2)"),
    fmt: str = typer.Option("onnx", "--format", help="onnx | pt2 (torch.export program)"),
    batch_size: int = typer.Option(2, help="batch of the traced example; the batch is dynamic"),
    opset: int = typer.Option(None, help="ONNX opset (default: the exporter's)"),
    fold: bool = typer.Option(
        False, help="first rebuild each bottleneck in its fastest exact form (timed here)"
    ),
    check: bool = typer.Option(True, help="compare the file's outputs with PyTorch's"),
    tolerance: float = typer.Option(1e-4, help="largest max-abs difference --check accepts"),
    force: bool = typer.Option(False, help="replace OUT (a link there is replaced, not followed)"),
) -> None:
    """Export a model to ONNX (checked with onnxruntime) or to a torch.export .pt2 file."""
    from ..errors import ModelError, OutputExistsError
    from ..export import export_model, max_abs_diff, trace_input
    from ..io import load_or_create

    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name (.onnx or .pt2)")
    if (out.exists() or out.is_symlink()) and not force:  # a dangling link counts too
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    net = load_or_create(model).eval()
    example = trace_input(net, batch_size)
    if fold:
        from ..surgery.fold import fold_for_speed

        net, forms = fold_for_speed(net, example)
        tally = ", ".join(f"{k} {v}" for k, v in sorted(Counter(forms.values()).items()))
        log(f"folded {len(forms)} bottleneck(s): {tally or 'none'}")
    export_model(net, out, example, fmt=fmt, opset=opset)
    log(f"wrote {out} ({fmt})")
    if check:
        diff = max_abs_diff(net, out, trace_input(net, batch_size + 1))
        log(f"max abs difference to PyTorch: {diff:.3g}")
        if not diff <= tolerance:
            raise ModelError(f"{out}: outputs differ from PyTorch by {diff:.3g} > {tolerance:g}")
