"""Result tables (Markdown, CSV) and accuracy-vs-compression trade-off plots, and the files
a comparison writes from its rows (``results.csv``/``.md`` and two plots); the terminal's
tables are the CLI's (:mod:`eigendamage.cli.tables`).

Rows are plain dicts (one per method x budget), so every output is a view of the same data;
all files are written atomically so a half-finished sweep never leaves a broken table.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write_bytes, atomic_write_text

Rows = Sequence[Mapping[str, Any]]
Columns = Sequence[str] | None  # None: every key of the rows, in first-seen order
PathLike = str | os.PathLike[str]

__all__ = [
    "COLUMNS",
    "REFERENCE",
    "columns_of",
    "format_value",
    "markdown_rows",
    "plot_tradeoff",
    "write_csv",
    "write_markdown_table",
    "write_results",
]


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Union of the rows' keys in first-seen order (stable across runs, unlike sets)."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def format_value(value: Any) -> str:
    """Human-friendly cell text: 2 decimals for ordinary numbers, 4 significant for small."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0 or abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4g}"
    return str(value)


def _md_cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def write_markdown_table(path: PathLike, rows: Rows, columns: Columns = None) -> Path:
    """GitHub-flavoured Markdown table: header, separator, one line per row."""
    cols = list(columns) if columns is not None else columns_of(rows)
    if not cols:
        raise ConfigError(f"cannot write table {path}: no columns (no rows?)")
    lines = [
        "| " + " | ".join(_md_cell(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_csv(path: PathLike, rows: Rows, columns: Columns = None) -> Path:
    """CSV with full-precision values; columns in first-seen order, missing cells empty."""
    cols = list(columns) if columns is not None else columns_of(rows)
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in cols})
    return atomic_write_text(path, buf.getvalue())


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool | str):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


_LABELS = {
    "params_removed_pct": "parameters removed (%)",
    "flops_removed_pct": "FLOPs removed (%)",
    "test_acc": "test accuracy",
}


def plot_tradeoff(
    rows: Rows,
    path: PathLike,
    *,
    x: str = "params_removed_pct",
    y: str = "test_acc",
    group: str = "method",
    title: str | None = None,
) -> Any:
    """Accuracy vs compression, one marked line per ``group`` value sorted by ``x``; PNG.

    Uses the Agg canvas directly (no pyplot state, no display needed) and returns the
    ``matplotlib.figure.Figure`` so callers and tests can inspect it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get(y))
        if xv is None or yv is None:
            continue
        series.setdefault(str(row.get(group, "")), []).append((xv, yv))
    if not series:
        raise ConfigError(f"cannot plot {y} vs {x}: no row has numeric values for both")

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^v<>pX*h"
    for i, (name, points) in enumerate(series.items()):
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers[i % len(markers)],
            label=name,
        )
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y))
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title=group)
    fig.tight_layout()
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return fig


# --------------------------------------------------------------------------- a comparison

REFERENCE = "original"  # the unpruned model's row

COLUMNS = (
    "method",
    "budget",
    "rounds",
    "status",
    "test_acc",
    "val_acc",
    "test_acc_change",
    "params",
    "flops",
    "params_removed_pct",
    "flops_removed_pct",
    "latency_ms",
    "speedup",
    "last_round_ratio",
    "prune_s",
    "finetune_s",
    "run",
    "error",
    "note",
)


def _fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    return format(value if scale == 1 else scale * value, spec) + unit


def markdown_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The rows as the Markdown table shows them (percent, points, ms, x)."""
    return [
        {
            "method": r["method"],
            "budget": r["budget"],
            "test acc (%)": _fmt(r.get("test_acc"), ".2f", 100),
            "change (pt)": _fmt(r.get("test_acc_change"), "+.2f", 100),
            "params removed (%)": _fmt(r.get("params_removed_pct"), ".1f"),
            "FLOPs removed (%)": _fmt(r.get("flops_removed_pct"), ".1f"),
            "params": _fmt(r.get("params"), ","),
            "FLOPs": _fmt(r.get("flops"), ","),
            "latency (ms)": _fmt(r.get("latency_ms"), ".3f"),
            "speed-up": _fmt(r.get("speedup"), ".2f", unit="x"),
            "note": r.get("error") or r.get("note") or "",
        }
        for r in rows
    ]


def write_results(rows: list[dict[str, Any]], out_dir: Path, *, title: str) -> None:
    """``results.csv`` (full precision), ``results.md`` and the two trade-off plots."""
    write_csv(out_dir / "results.csv", rows, COLUMNS)
    write_markdown_table(out_dir / "results.md", markdown_rows(rows))
    reference = next(r for r in rows if r["status"] == "reference")
    plotted = [
        {**r, "test accuracy (%)": 100 * r["test_acc"]}
        for r in rows
        if r["status"] == "ok" and r.get("test_acc") is not None
    ]
    if not plotted:
        return
    for x, stem in (("params_removed_pct", "acc_vs_params"), ("flops_removed_pct", "acc_vs_flops")):
        path = out_dir / f"{stem}.png"
        fig = plot_tradeoff(plotted, path, x=x, y="test accuracy (%)", title=title)
        _restyle(fig, reference.get("test_acc"), path)


def _restyle(fig: Any, reference_acc: float | None, path: Path) -> None:
    """Distinct colours for up to 20 methods (the default cycle repeats after 10) and the
    unpruned model as a dashed horizontal line; rewrites ``path``."""
    from matplotlib import colormaps

    ax = fig.axes[0]
    colors = colormaps["tab20"].colors
    for i, line in enumerate(ax.get_lines()):
        line.set_color(colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20])
    if reference_acc is not None:
        ax.axhline(100 * reference_acc, color="black", linestyle="--", linewidth=1, label=REFERENCE)
    ax.legend(title="method", fontsize="small")
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
