"""`eigendamage export` commands (registered on the main typer app)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .app import app, friendly_errors, log

if TYPE_CHECKING:
    from ..export import Folded

FOLD_HELP = (
    "rebuild the EigenDamage bottlenecks first: none (as pruned: the fewest parameters), "
    "params (each in its form with the fewest parameters), latency (each in the form that "
    "runs fastest here, timed: it may be much larger and can differ between runs; the "
    "choice is written to OUT.forms.json), or a FILE.json of forms (replays that choice)"
)


@app.command("export")
@friendly_errors
def export_cmd(
    model: str = typer.Argument(..., help="model directory (from save_model) or model name"),
    out: Path = typer.Argument(..., help="file to write: .onnx or .pt2 (its format)"),
    fmt: str = typer.Option(None, "--format", help="onnx | pt2 (default: from OUT's extension)"),
    batch_size: int = typer.Option(2, help="batch of the traced example; the batch is dynamic"),
    opset: int = typer.Option(None, help="ONNX opset (default: the exporter's)"),
    fold: str = typer.Option("none", help=FOLD_HELP),
    check: bool = typer.Option(True, help="compare the file's outputs with PyTorch's"),
    tolerance: float = typer.Option(1e-4, help="largest max-abs difference --check accepts"),
    force: bool = typer.Option(False, help="replace OUT (a link there is replaced, not followed)"),
) -> None:
    """Export a model to ONNX (checked with onnxruntime) or to a torch.export .pt2 file."""
    from ..errors import ConfigError, ModelError, OutputExistsError
    from ..export import FOLDS, export_model, fold_for_export, format_for, max_abs_diff, trace_input
    from ..io import atomic_write_json, load_or_create

    fmt = format_for(out, fmt)
    if fold not in FOLDS and not fold.endswith(".json"):
        raise ConfigError(f"--fold must be one of {', '.join(FOLDS)} or a .json file of forms")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name (.onnx or .pt2)")
    forms_out = out.with_name(out.name + ".forms.json") if fold == "latency" else None
    for path in (out, forms_out):
        if path is not None and (path.exists() or path.is_symlink()) and not force:
            raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    how = _read_forms(Path(fold)) if fold.endswith(".json") else fold
    net = load_or_create(model).eval()
    example = trace_input(net, batch_size)
    folded = fold_for_export(net, how, example)
    net = folded.model
    if folded.forms:
        _report_fold(fold, folded)
    export_model(net, out, example, fmt=fmt, opset=opset)
    log(f"wrote {out} ({fmt})")
    if forms_out is not None:
        atomic_write_json(forms_out, folded.forms)
        log(f"wrote {forms_out}; export with --fold {forms_out} to get the same forms again")
    if check:
        diff = max_abs_diff(net, out, trace_input(net, batch_size + 1))
        log(f"max abs difference to PyTorch: {diff:.3g}")
        if not diff <= tolerance:
            raise ModelError(f"{out}: outputs differ from PyTorch by {diff:.3g} > {tolerance:g}")


def _read_forms(path: Path) -> dict[str, str]:
    """``{layer: form}`` from a ``.forms.json`` written by ``--fold latency``."""
    from ..config_files import read_config_file
    from ..errors import ConfigError

    forms = read_config_file(path)
    if not all(isinstance(v, str) for v in forms.values()):
        raise ConfigError(f"--fold {path}: expected {{layer: form}} with forms as strings")
    return forms


def _report_fold(fold: str, folded: Folded) -> None:
    """One line: forms chosen, how many changed, parameters before -> after."""
    tally = ", ".join(f"{k} {v}" for k, v in sorted(Counter(folded.forms.values()).items()))
    before, after = folded.params_before, folded.params_after
    log(
        f"fold {fold}: {len(folded.forms)} bottleneck(s) [{tally}], {len(folded.changed)} "
        f"changed form; params {before:,} -> {after:,}"
    )
    for name, (old, new) in sorted(folded.changed.items()):
        log(f"  {name}: {old} -> {new}")
    if after > before:
        log(f"note: the exported model has {after / before:.2f}x the pruned model's parameters")
