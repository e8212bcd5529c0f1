"""Tables and trade-off plots."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from rich.console import Console

from eigendamage.cli.tables import metrics_table, print_table
from eigendamage.errors import ConfigError
from eigendamage.report import (
    columns_of,
    format_value,
    plot_tradeoff,
    write_csv,
    write_markdown_table,
)

ROWS = [
    {"method": "eigendamage", "ratio": 0.5, "params_removed_pct": 60.1, "test_acc": 0.93},
    {"method": "eigendamage", "ratio": 0.3, "params_removed_pct": 35.0, "test_acc": 0.94},
    {"method": "c-obd", "ratio": 0.5, "params_removed_pct": 55.5, "test_acc": 0.90},
    {"method": "c-obd", "ratio": 0.3, "params_removed_pct": 30.2, "test_acc": 0.92, "note": "a|b"},
    {"method": "l1", "ratio": 0.3, "params_removed_pct": None, "test_acc": 0.80},
    {"method": "l1", "ratio": 0.5, "params_removed_pct": 50.0, "test_acc": 0.85},
]


def test_columns_and_formatting() -> None:
    assert columns_of(ROWS) == ["method", "ratio", "params_removed_pct", "test_acc", "note"]
    assert format_value(None) == "-"
    assert format_value(93.456) == "93.46"
    assert format_value(0.0012345) == "0.001234"
    assert format_value(12) == "12" and format_value(True) == "True"
    assert format_value(float("nan")) == "nan"


def test_metrics_table_and_print() -> None:
    table = metrics_table(ROWS, "results")
    assert table.title == "results" and len(table.columns) == 5 and table.row_count == len(ROWS)
    console = Console(record=True, width=120)
    print_table(ROWS, "results", console=console)
    text = console.export_text()
    assert "eigendamage" in text and "60.10" in text


def test_markdown_table(tmp_path: Path) -> None:
    path = write_markdown_table(tmp_path / "r.md", ROWS, ["method", "ratio", "test_acc", "note"])
    lines = path.read_text().splitlines()
    assert lines[0] == "| method | ratio | test_acc | note |"
    assert lines[1] == "|---|---|---|---|"
    assert len(lines) == 2 + len(ROWS)
    assert lines[2] == "| eigendamage | 0.5 | 0.93 | - |"
    assert "a\\|b" in lines[5]
    with pytest.raises(ConfigError):
        write_markdown_table(tmp_path / "e.md", [])


def test_csv_roundtrip(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", ROWS)
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == columns_of(ROWS)
    assert len(read) == len(ROWS)
    for row, got in zip(ROWS, read, strict=True):
        for key in columns_of(ROWS):
            value = row.get(key)
            assert got[key] == ("" if value is None else str(value))
    assert float(read[1]["params_removed_pct"]) == 35.0  # full precision, not formatted


def test_plot_tradeoff(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "tradeoff.png"
    fig = plot_tradeoff(ROWS, out, x="params_removed_pct", y="test_acc", group="method")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3  # one per method
    by_label = {line.get_label(): line for line in lines}
    assert list(by_label["eigendamage"].get_xdata()) == [35.0, 60.1]  # sorted by x
    assert list(by_label["l1"].get_xdata()) == [50.0]  # the row without x is skipped
    assert by_label["eigendamage"].get_marker() != "None"
    assert ax.get_xlabel() == "parameters removed (%)" and ax.get_ylabel() == "test accuracy"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"eigendamage", "c-obd", "l1"}
    assert list(tmp_path.joinpath("plots").iterdir()) == [out]  # no temp files left


def test_plot_needs_numeric_rows(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="flops_removed_pct"):
        plot_tradeoff(ROWS, tmp_path / "p.png", x="flops_removed_pct")
