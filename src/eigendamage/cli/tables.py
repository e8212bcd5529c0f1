"""Result rows as rich tables on the terminal (the library's rows are plain dicts, see
:mod:`eigendamage.report`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..report import Columns, Rows, columns_of, format_value

UNBOUNDED = 1_000_000  # columns a table may take when not fitted to a terminal


def metrics_table(rows: Rows, title: str | None = None, columns: Columns = None) -> Table:
    """A ``rich.table.Table`` of ``rows`` (numbers right-aligned)."""
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
    rows: Rows, title: str | None = None, columns: Columns = None, console: Console | None = None
) -> None:
    """Print :func:`metrics_table` to ``console`` (stdout by default).

    On stdout that is not a terminal (a file, a pipe) the table keeps its full width: rich
    would otherwise fit it to 80 columns and cut or wrap the cells.
    """
    table = metrics_table(rows, title, columns)
    if console is None:
        console = Console()
        if not console.is_terminal:
            unbounded = console.options.update_width(UNBOUNDED)
            natural = console.measure(table, options=unbounded).maximum
            console = Console(width=max(console.width, natural))
    console.print(table)
