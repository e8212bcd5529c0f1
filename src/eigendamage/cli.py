"""The ``eigendamage`` command line (typer + rich).

Every expected failure (bad path, unknown name, invalid value, existing output, a usage
error such as a non-numeric ``--ratio``) is printed as one line ``error: ...`` on stderr
with exit code 2 (3 for out of memory or a full disk, 130 for Ctrl-C); a traceback means a bug.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from .config import PICKLE_IN_FILE, PruneConfig, TrainConfig, build_config, load_config
from .errors import ConfigError, EigenDamageError

try:  # recent typer vendors click: its usage errors derive from TyperException
    from typer import TyperException as UsageErrorBase
except ImportError:  # pragma: no cover - older typer on top of click
    from click import ClickException as UsageErrorBase


class _App(typer.Typer):
    """Typer app whose usage errors are one ``error:`` line like every other failure
    (typer's default is a framed box), for the installed script and ``python -m``."""

    def __call__(self, args: Sequence[str] | None = None, prog_name: str | None = None) -> Any:
        sys.exit(main(args, prog_name))


app = _App(
    help="Hessian-aware structured pruning in the Kronecker-factored eigenbasis (EigenDamage).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130
OOM_HINT = "use fewer --fisher-batches, a smaller --batch-size, or --device cpu"
DISK_FULL_HINT = "free some space and run again"


def _error(message: str) -> None:
    """Print ``error: message`` as exactly one line (messages may quote multi-line text)."""
    err_console.print(
        "error: " + " ".join(message.split()), markup=False, highlight=False, soft_wrap=True
    )


def main(args: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return the exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(
            list(args) if args is not None else None, prog_name=prog_name, standalone_mode=False
        )
    except UsageErrorBase as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: a bare group
            exc.show()
            return exc.exit_code
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error(exc.format_message() + hint)
        return EXIT_ERROR
    except typer.Abort:
        return 1
    return result if isinstance(result, int) else 0


class _WarningHandler(logging.Handler):
    """Library warnings (e.g. damping escalation) as one ``warning:`` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(
            "warning: " + " ".join(record.getMessage().split()),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _route_library_warnings() -> None:
    logger = logging.getLogger("eigendamage")
    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        logger.addHandler(_WarningHandler(logging.WARNING))


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    # CUDA: "CUDA out of memory"; CPU allocator: "DefaultCPUAllocator: can't allocate memory"
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def friendly_errors(func: F) -> F:
    """Turn expected failures into one clear line and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _route_library_warnings()
        try:
            return func(*args, **kwargs)
        except EigenDamageError as exc:
            _error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            run = kwargs.get("resume") or kwargs.get("out")
            hint = f"; continue with --resume {run}" if run else ""
            err_console.print(f"interrupted{hint}", markup=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (MemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc):
                raise
            detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            _error(f"out of memory{f' ({detail})' if detail else ''}; {OOM_HINT}")
            raise typer.Exit(EXIT_OOM) from None
        except OSError as exc:  # disk full, permission denied, a file vanishing mid-run
            where = f": {exc.filename}" if exc.filename else ""
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a resource, like memory: exit 3
                _error(f"{exc.strerror or 'disk full'}{where}; {DISK_FULL_HINT}")
                raise typer.Exit(EXIT_OOM) from None
            _error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _log(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _flag(field: str) -> str:
    """The command-line option that sets config ``field`` (``finetune.lr`` -> ``--finetune-lr``)."""
    return "--data" if field == "dataset" else "--" + field.replace(".", "-").replace("_", "-")


def _config(cls: type, path: Path | None, overrides: dict[str, Any]) -> Any:
    """A validated config: the file (if any) with the command-line values on top."""
    return build_config(cls, path, overrides)


def _out_dir(out: Path | None, resume: Path | None) -> tuple[Path, bool]:
    """(run directory, resuming?) from ``--out`` / ``--resume``."""
    if resume is None:
        if out is None:
            raise ConfigError("--out DIR is required (or --resume DIR to continue a run)")
        return out, False
    if out is not None and out != resume:
        raise ConfigError("give either --out DIR or --resume DIR, not both")
    if not resume.is_dir() or not (resume / "config.json").is_file():
        raise ConfigError(
            f"--resume {resume}: no run found there (config.json missing); start one with --out"
        )
    return resume, True


def _run_config(
    cls: type,
    out: Path | None,
    resume: Path | None,
    config: Path | None,
    force: bool,
    overrides: dict[str, Any],
) -> tuple[Any, Path, bool]:
    """(validated config, run directory, resuming?) from the command's options.

    ``--resume DIR`` continues with ``DIR/config.json`` exactly: options that would change
    the run are refused rather than silently ignored.
    """
    out_dir, resuming = _out_dir(out, resume)
    if not resuming:
        return _config(cls, config, overrides), out_dir, False
    given = [_flag(k) for k, v in overrides.items() if v is not None]
    given += ["--config"] * (config is not None) + ["--force"] * force
    if given:
        raise ConfigError(
            f"--resume {out_dir} continues with its own config.json; drop {', '.join(given)} "
            "(or start a new run with --out)"
        )
    try:
        cfg = load_config(out_dir / "config.json", cls)
    except ConfigError as exc:
        if PICKLE_IN_FILE in str(exc):  # a run of an older version: it is the right kind
            raise ConfigError(f"--resume {out_dir}: {exc}") from None
        kind = "train" if cls is TrainConfig else "prune"
        raise ConfigError(f"--resume {out_dir}: not a `{kind}` run ({exc})") from None
    return cfg, out_dir, True


@app.command("train")
@friendly_errors
def train_cmd(
    model: str = typer.Option(None, help="model name (see `eigendamage models`)"),
    data: str = typer.Option(
        None, "--data", help="digits, cifar10, cifar100, fashion-mnist, mnist, idx, ..."
    ),
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
    resume: Path = typer.Option(None, help="continue the (killed) run in this directory"),
    force: bool = typer.Option(False, help="replace the run in an existing --out"),
    no_progress: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Train a model from scratch and save it (the checkpoint to prune)."""
    from .runner import run_train

    overrides = dict(
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
    )
    cfg, out_dir, resuming = _run_config(TrainConfig, out, resume, config, force, overrides)
    run_train(cfg, out_dir, force=force, resume=resuming, log=_log, progress=not no_progress)


@app.command("prune")
@friendly_errors
def prune_cmd(
    model: str = typer.Option(
        None, help="model name: an untrained model, or the architecture of a state_dict file"
    ),
    checkpoint: str = typer.Option(None, help="model directory written by `train`/`prune`"),
    allow_pickle: bool = typer.Option(
        False,
        help="load a legacy torch.save --checkpoint (unpickling runs its code: trust it!); "
        "never stored in the run: give it again with --resume",
    ),
    data: str = typer.Option(
        None, "--data", help="digits, cifar10, cifar100, fashion-mnist, mnist, idx, ..."
    ),
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
    normalize: bool = typer.Option(
        None,
        "--normalize/--no-normalize",
        help="channel criteria: divide each layer's scores by their sum (default: off)",
    ),
    finetune_epochs: int = typer.Option(None, help="fine-tuning epochs per round"),
    finetune_lr: float = typer.Option(None),
    batch_size: int = typer.Option(None),
    seed: int = typer.Option(None),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    config: Path = typer.Option(None, help="JSON/TOML PruneConfig (e.g. configs/...)"),
    out: Path = typer.Option(None, help="run directory to create"),
    resume: Path = typer.Option(None, help="continue the (killed) run in this directory"),
    force: bool = typer.Option(False, help="replace the run in an existing --out"),
    no_progress: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Prune a model; writes config, metrics and the pruned model into --out."""
    from .report import print_table
    from .runner import run_prune, summary_rows

    overrides = {
        "model": model,
        "checkpoint": checkpoint,
        "dataset": data,
        "data_root": data_root,
        "method": method,
        "ratio": ratio,
        "target_params": target_params,
        "target_flops": target_flops,
        "rounds": rounds,
        "per_layer_cap": per_layer_cap,
        "fisher": fisher,
        "fisher_batches": fisher_batches,
        "damping": damping,
        "normalize": normalize,
        "finetune.epochs": finetune_epochs,
        "finetune.lr": finetune_lr,
        "batch_size": batch_size,
        "seed": seed,
        "device": device,
    }
    cfg, out_dir, resuming = _run_config(PruneConfig, out, resume, config, force, overrides)
    metrics = run_prune(
        cfg,
        out_dir,
        force=force,
        resume=resuming,
        allow_pickle=allow_pickle,
        log=_log,
        progress=not no_progress,
    )
    from .distributed import is_main
    from .reported import NONZERO_NOTE, method_label, sparse_params

    if is_main():  # under torchrun every rank returns the same metrics: print them once
        shown = sparse_params(metrics)
        note = f" ({NONZERO_NOTE})" if shown is not metrics else ""
        print_table(summary_rows(shown), title=f"{method_label(cfg)}: {out_dir}{note}")


@app.command("demo")
@friendly_errors
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="run directory"),
    force: bool = typer.Option(False, help="write into an existing --out"),
    seed: int = typer.Option(0, min=0),
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


@app.command("methods")
def methods_cmd() -> None:
    """List the pruning methods, one per line with a note (docs/method.md has the
    formulas).  Channel criteria also take --normalize (in compare: NAME+norm)."""
    from .pruner import available_methods
    from .tp_baselines import TP_METHODS

    names = available_methods()
    width = max(map(len, names))
    for name in names:
        note = METHOD_NOTES.get(name) or TP_METHODS.get(name, ("", {}, ""))[2]
        line = f"{name:<{width}}  {note}".rstrip()
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# Commands defined in their own modules register themselves on `app` when imported.
from . import cli_bench, cli_compare, cli_export, cli_latency  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover - ``python -m eigendamage.cli``
    # Run the package's copy of this module: the command modules above registered their
    # commands on *its* ``app``, not on this ``__main__`` copy's.
    from eigendamage.cli import main as package_main

    sys.exit(package_main())
