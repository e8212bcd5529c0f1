"""The ``eigendamage`` command line (typer + rich).

Every expected failure (bad path, unknown name, invalid value, existing output) is printed
as one line ``error: ...`` on stderr with exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from .config import PruneConfig, TrainConfig, load_config, merge_overrides
from .errors import ConfigError, EigenDamageError

app = typer.Typer(
    help="Hessian-aware structured pruning in the Kronecker-factored eigenbasis (EigenDamage).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn expected failures into one clear line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EigenDamageError as exc:
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except MemoryError:
            err_console.print(
                "error: out of memory; use fewer --fisher-batches, a smaller --batch-size or "
                "--device cpu",
                markup=False,
                soft_wrap=True,
            )
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; continue with --resume", markup=False)
            raise typer.Exit(130) from None
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                err_console.print(
                    "error: out of GPU memory; use fewer --fisher-batches, a smaller "
                    "--batch-size, or --device cpu",
                    markup=False,
                    soft_wrap=True,
                )
                raise typer.Exit(3) from None
            raise

    return wrapper  # type: ignore[return-value]


def _log(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def _config(cls: type, path: Path | None, overrides: dict[str, Any]) -> Any:
    """A validated config: the file (if any) with the command-line values on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if path is not None:
        return merge_overrides(load_config(path, cls), given)
    try:
        return cls(**given)
    except Exception as exc:  # pydantic.ValidationError -> one line
        from pydantic import ValidationError

        from .config import format_validation_error

        if isinstance(exc, ValidationError):
            raise ConfigError(format_validation_error(exc, "command line", cls)) from None
        raise


def _out_dir(out: Path | None, resume: Path | None) -> tuple[Path, bool]:
    if resume is not None:
        if out is not None and out != resume:
            raise ConfigError("give either --out DIR or --resume DIR, not both")
        if not (resume / "config.json").is_file():
            raise ConfigError(f"--resume {resume}: no run found there (config.json missing)")
        return resume, True
    if out is None:
        raise ConfigError("--out DIR is required (or --resume DIR to continue a run)")
    return out, False


def _resumed_config(cls: type, out_dir: Path) -> Any:
    return load_config(out_dir / "config.json", cls)


@app.command("train")
@friendly_errors
def train_cmd(
    model: str = typer.Option(None, help="model name (see `eigendamage models`)"),
    data: str = typer.Option(None, "--data", help="dataset: digits, cifar10, cifar100, ..."),
    data_root: str = typer.Option(None, help="folder holding the dataset files"),
    epochs: int = typer.Option(None),
    lr: float = typer.Option(None),
    batch_size: int = typer.Option(None),
    weight_decay: float = typer.Option(None),
    schedule: str = typer.Option(None, help="step | cosine | constant"),
    l1_bn: float = typer.Option(None, help="L1 on BN scales (Network Slimming)"),
    seed: int = typer.Option(None),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    config: Path = typer.Option(None, help="JSON/TOML TrainConfig"),
    out: Path = typer.Option(None, help="run directory to create"),
    resume: Path = typer.Option(None, help="continue the run in this directory"),
    force: bool = typer.Option(False, help="write into an existing --out"),
    no_progress: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Train a model from scratch and save it (the checkpoint to prune)."""
    from .runner import run_train

    out_dir, resuming = _out_dir(out, resume)
    if resuming:
        cfg = _resumed_config(TrainConfig, out_dir)
    else:
        cfg = _config(
            TrainConfig,
            config,
            dict(
                model=model,
                dataset=data,
                data_root=data_root,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                weight_decay=weight_decay,
                schedule=schedule,
                l1_bn=l1_bn,
                seed=seed,
                device=device,
            ),
        )
    run_train(cfg, out_dir, force=force, resume=resuming, log=_log, progress=not no_progress)


@app.command("prune")
@friendly_errors
def prune_cmd(
    model: str = typer.Option(None, help="model name (untrained; prefer --checkpoint)"),
    checkpoint: str = typer.Option(None, help="model directory written by `train`/`prune`"),
    data: str = typer.Option(None, "--data", help="dataset: digits, cifar10, cifar100, ..."),
    data_root: str = typer.Option(None, help="folder holding the dataset files"),
    method: str = typer.Option(None, help="eigendamage, c-obd, c-obs, kron-obd, kron-obs, ..."),
    ratio: float = typer.Option(None, help="fraction of units removed per round"),
    target_params: float = typer.Option(None, help="fraction of parameters kept at the end"),
    target_flops: float = typer.Option(None, help="fraction of FLOPs kept at the end"),
    rounds: int = typer.Option(None, help="prune -> fine-tune rounds"),
    per_layer_cap: float = typer.Option(None, help="max fraction removed per layer side"),
    fisher: str = typer.Option(None, help="true | empirical"),
    fisher_batches: int = typer.Option(None, help="batches for curvature (default: all)"),
    damping: float = typer.Option(None, help="relative damping of the factors"),
    finetune_epochs: int = typer.Option(None, help="fine-tuning epochs per round"),
    finetune_lr: float = typer.Option(None),
    batch_size: int = typer.Option(None),
    seed: int = typer.Option(None),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    config: Path = typer.Option(None, help="JSON/TOML PruneConfig (e.g. configs/...)"),
    out: Path = typer.Option(None, help="run directory to create"),
    resume: Path = typer.Option(None, help="continue the run in this directory"),
    force: bool = typer.Option(False, help="write into an existing --out"),
    no_progress: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Prune a model; writes config, metrics and the pruned model into --out."""
    from .report import print_table
    from .runner import run_prune, summary_rows

    out_dir, resuming = _out_dir(out, resume)
    if resuming:
        cfg = _resumed_config(PruneConfig, out_dir)
    else:
        overrides = dict(
            model=model,
            checkpoint=checkpoint,
            dataset=data,
            data_root=data_root,
            method=method,
            ratio=ratio,
            target_params=target_params,
            target_flops=target_flops,
            rounds=rounds,
            per_layer_cap=per_layer_cap,
            fisher=fisher,
            fisher_batches=fisher_batches,
            damping=damping,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        if finetune_epochs is not None:
            overrides["finetune.epochs"] = finetune_epochs
        if finetune_lr is not None:
            overrides["finetune.lr"] = finetune_lr
        cfg = _config(PruneConfig, config, overrides)
    metrics = run_prune(
        cfg, out_dir, force=force, resume=resuming, log=_log, progress=not no_progress
    )
    print_table(summary_rows(metrics), title=f"{cfg.method}: {out_dir}")


@app.command("demo")
@friendly_errors
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="run directory"),
    force: bool = typer.Option(False, help="write into an existing --out"),
    seed: int = typer.Option(0),
    no_progress: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """The default job: train a VGG-style net on the embedded digits data, prune it with
    EigenDamage over 3 rounds with fine-tuning, and print accuracy/params/FLOPs."""
    from .demo import run_demo

    run_demo(out, force=force, seed=seed, log=_log, progress=not no_progress)


@app.command("models")
def models_cmd() -> None:
    """List the built-in model names (plus torchvision:NAME and timm:NAME)."""
    from .models import list_models

    for name in list_models():
        console.print(name)


@app.command("methods")
def methods_cmd() -> None:
    """List the pruning methods."""
    from .pruner import available_methods

    for name in available_methods():
        console.print(name)


# Commands defined in their own modules register themselves on `app` when imported.
from . import cli_bench, cli_compare, cli_export, cli_latency  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
