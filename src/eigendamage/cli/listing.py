"""`eigendamage models` and `eigendamage methods`: what the other commands accept."""

from __future__ import annotations

from .app import app, console

METHOD_NOTES = {
    "eigendamage": "EigenDamage: eigen-directions of the K-FAC eigenbasis (the paper)",
    "eigendamage-dw": "EigenDamage with depthwise-separable cores",
    "c-obd": "channels: OBD with the exact diagonal Fisher",
    "c-obs": "channels: OBS per weight under the K-FAC inverse, with update",
    "kron-obd": "channels: 1/2 S_ii w_i'A w_i (the paper's Kron-OBD)",
    "kron-obd-orig": "channels: Kron-OBD as the original code scored it",
    "kron-obs": "channels: row-constrained OBS under A (x) S, joint update",
    "kron-obs-orig": "channels: Kron-OBS as the original code scored and updated it",
    "l1": "channels: filter L1 norm, same fraction of every layer (Li et al.)",
    "random": "channels: seeded random scores",
    "slimming": "channels: |BatchNorm gamma| (network slimming)",
    "obd": "weights: OBD under K-FAC (zeroed, shapes kept)",
    "obs": "weights: OBS under K-FAC with update (zeroed, shapes kept)",
}


@app.command("models")
def models_cmd() -> None:
    """List the built-in model names (plus torchvision:NAME and timm:NAME)."""
    from ..models import list_models

    for name in list_models():
        console.print(name)


@app.command("methods")
def methods_cmd() -> None:
    """List the pruning methods, one per line with a note (docs/method.md has the
    formulas).  Channel criteria also take --normalize (in compare: NAME+norm)."""
    from ..methods import available_methods
    from ..methods.torch_pruning import TP_METHODS

    names = available_methods()
    width = max(map(len, names))
    for name in names:
        note = METHOD_NOTES.get(name) or TP_METHODS.get(name, ("", {}, ""))[2]
        line = f"{name:<{width}}  {note}".rstrip()
        console.print(line, markup=False, highlight=False, soft_wrap=True)
