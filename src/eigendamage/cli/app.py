"""The ``eigendamage`` typer app and what every command shares: one-line errors, exit codes,
logging, and turning ``--out``/``--resume``/``--config`` plus options into a run's config.

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

from ..config import PICKLE_IN_FILE, TrainConfig, build_config, load_config
from ..errors import ConfigError, EigenDamageError
from .options import flag, overrides

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


def _print_version(given: bool) -> None:
    if given:
        from .. import __version__

        console.print(f"eigendamage {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        help="print the version and exit",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """Options of ``eigendamage`` itself (before the command)."""


F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")
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


def log(message: str) -> None:
    """A progress line of a command on stdout, printed as it is (no rich markup)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


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


def run_config(
    cls: type[C], ctx: typer.Context, *, replace: dict[str, Any] | None = None
) -> tuple[C, Path, bool]:
    """(validated config, run directory, resuming?) from the command's options.

    The options named after ``cls``'s fields override the ``--config`` file (see
    :func:`.options.overrides`).  ``--resume DIR`` continues with ``DIR/config.json``
    exactly: options that would change the run are refused rather than silently ignored.

    Args:
        cls: the config to build (TrainConfig, PruneConfig, CompareConfig).
        ctx: the command's context; its ``out``, ``resume``, ``config`` and ``force``
            options are read here.
        replace: values of some fields' options after parsing or defaulting (by field).

    Returns:
        The config, the run directory and whether the run is resumed.

    Raises:
        ConfigError: conflicting or missing options, or a config that does not validate.
    """
    params = ctx.params
    out, resume, config, force = (params[k] for k in ("out", "resume", "config", "force"))
    values = {**overrides(cls, ctx), **(replace or {})}
    out_dir, resuming = _out_dir(out, resume)
    if not resuming:
        options = {field: flag(field) for field in values}
        return build_config(cls, config, values, options=options), out_dir, False
    given = [flag(k) for k, v in values.items() if v is not None]
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
