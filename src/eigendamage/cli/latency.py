"""`eigendamage bench latency`: pruned vs original model latency, next to FLOPs."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import friendly_errors, log
from .bench import bench_app


@bench_app.command("latency")
@friendly_errors
def latency_cmd(
    model: list[str] = typer.Option(
        ...,
        "--model",
        help="pruned model directory, model name or .onnx file (onnxruntime, CPU); repeatable",
    ),
    baseline: str = typer.Option(
        None,
        help="original model directory, name or .onnx file (default: the first --model's base)",
    ),
    batch_size: list[int] = typer.Option([1, 8], "--batch-size", help="repeatable"),
    input_size: str = typer.Option(
        None, help="one example's shape, e.g. 3,224,224 (default: the model's own)"
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    threads: int = typer.Option(None, help="torch intra-op threads (default: torch's)"),
    warmup: int = typer.Option(5, help="untimed runs before each measurement"),
    repeats: int = typer.Option(20, help="timed runs per measurement (median)"),
    rounds: int = typer.Option(3, help="alternating measurements per model (median)"),
    fold: bool = typer.Option(
        True, "--fold/--no-fold", help="also time each pruned model in its fastest exact form"
    ),
    json_out: Path = typer.Option(None, "--json", help="also write the rows as JSON"),
) -> None:
    """Median latency of pruned models vs their original, speed-up and FLOPs reduction."""
    import torch

    from ..errors import ConfigError
    from ..io import load_or_create
    from ..latency import OnnxModel, latency_table, run_latency_bench
    from ..models import create_from_spec

    def load(name: str) -> torch.nn.Module:
        if name.lower().endswith(".onnx"):
            return OnnxModel(name, threads)
        return load_or_create(name)

    if device == "auto":
        onnx = any(n.lower().endswith(".onnx") for n in [*model, baseline or ""])
        device = "cuda" if torch.cuda.is_available() and not onnx else "cpu"
    shape = None
    if input_size is not None:
        try:
            shape = (1, *(int(p) for p in input_size.split(",")))
        except ValueError:
            raise ConfigError(
                f"--input-size: expected e.g. 3,224,224, got {input_size!r}"
            ) from None
    pruned = {name: load(name) for name in model}
    if baseline is None:
        first = pruned[model[0]]
        if isinstance(first, OnnxModel):
            raise ConfigError(
                f"{model[0]}: an ONNX file does not record its original model; "
                "give --baseline (a model directory, name or .onnx file)"
            )
        base, baseline = create_from_spec(first.eigendamage_spec), "original (random init)"
    else:
        base = load(baseline)
    rows = run_latency_bench(
        {baseline: base, **pruned},
        baseline=baseline,
        input_shape=shape,
        batch_sizes=batch_size,
        device=device,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        rounds=rounds,
        fold=fold,
    )
    typer.echo(latency_table(rows))
    if json_out is not None:
        from ..io import atomic_write_json

        atomic_write_json(json_out, [r.to_dict() for r in rows])
        log(f"wrote {json_out}")
