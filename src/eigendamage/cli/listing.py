"""`eigendamage models` and `eigendamage methods`: what the other commands accept."""

from __future__ import annotations

from importlib.util import find_spec

from .app import app, console

# source prefix -> (what NAME is, an example, the module it needs, how to install it)
MODEL_SOURCES = {
    "torchvision": ("any torchvision.models builder", "torchvision:resnet18", "torchvision"),
    "timm": ("any timm model", "timm:resnet18", "timm"),
    "hf": ("a Hugging Face sequence classifier", "hf:bert-base-uncased", "transformers"),
    "hf-lm": ("a Hugging Face causal language model", "hf-lm:gpt2", "transformers"),
}
EXTRA = "pip install 'eigendamage[models]'"


def _say(line: str) -> None:
    console.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)


def _table(rows: list[tuple[str, ...]]) -> None:
    """Rows as left-aligned columns (the last one as it is)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        _say(
            "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )


@app.command("models")
def models_cmd() -> None:
    """List the built-in model names, then the sources `--model SOURCE:NAME` takes
    (architectures only: weights are never downloaded)."""
    from ..models import list_models

    for name in list_models():
        _say(name)
    _say("")
    _say("other sources (--model SOURCE:NAME):")
    rows = []
    for source, (what, example, module) in MODEL_SOURCES.items():
        installed = find_spec(module) is not None
        state = "installed" if installed else f"needs {module}: {EXTRA}"
        rows.append((f"{source}:NAME", what, f"e.g. {example}", f"({state})"))
    _table(rows)


@app.command("methods")
def methods_cmd() -> None:
    """List the pruning methods: the budgets each takes (--ratio, --target-params,
    --target-flops), what --ratio is a fraction of, and what it does (docs/method.md has
    the formulas).  Channel criteria also take --normalize (in compare: NAME+norm)."""
    from ..methods import available_methods, get_method

    rows = [("method", "budgets", "ratio of", "description")]
    for name in available_methods():
        method = get_method(name)
        rows.append((name, " ".join(method.budgets), method.units, method.description))
    _table(rows)
