"""Result tables (terminal, Markdown, CSV) and accuracy-vs-compression trade-off plots.

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

__all__ = [
    "columns_of",
    "format_value",
    "metrics_table",
    "plot_tradeoff",
    "print_table",
    "write_csv",
    "write_markdown_table",
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


def metrics_table(
    rows: Sequence[Mapping[str, Any]],
    title: str | None = None,
    columns: Sequence[str] | None = None,
) -> Any:
    """A ``rich.table.Table`` of ``rows`` (numbers right-aligned)."""
    from rich.table import Table

    cols = list(columns) if columns is not None else columns_of(rows)
    table = Table(title=title)
    for col in cols:
        numeric = any(
            isinstance(r.get(col), int | float) and not isinstance(r.get(col), bool) for r in rows
        )
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(format_value(row.get(c)) for c in cols))
    return table


def print_table(
    rows: Sequence[Mapping[str, Any]],
    title: str | None = None,
    columns: Sequence[str] | None = None,
    console: Any = None,
) -> None:
    """Print :func:`metrics_table` to ``console`` (stdout by default)."""
    from rich.console import Console

    (console or Console()).print(metrics_table(rows, title, columns))


def _md_cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def write_markdown_table(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> Path:
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


def write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> Path:
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
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
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
