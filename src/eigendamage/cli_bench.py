"""`eigendamage bench ...` commands: the `bench` group, shared by the benchmark modules."""

import typer

from .cli import app, friendly_errors  # noqa: F401

bench_app = typer.Typer(
    help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
