"""Options shared by several commands, and the one table from options to config fields.

An option named after a config field overrides that field (``--ratio`` sets
``PruneConfig.ratio``); the exceptions are :data:`FIELD_OPTIONS`.  The overrides are
generated from the pydantic config and the command's declared options, so a field and its
option never need listing twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from ..config import PruneConfig
from ..errors import ConfigError

# Config field -> command-line parameter, where the name is not the field's own.
FIELD_OPTIONS = {
    "dataset": "data",
    "finetune.epochs": "finetune_epochs",
    "finetune.lr": "finetune_lr",
}


def with_default(cls: type[BaseModel], field: str, help: str = "") -> str:
    """``help`` followed by ``(default: X)``, X the default of config ``field``.

    Why: options default to None (so a config file's value is kept unless the option is
    given), and typer shows no default then; the real default is the config's.

    Args:
        cls: the config the option sets.
        field: the field, dotted for a nested one (``finetune.lr``).
        help: the option's help text.

    Returns:
        The help text; ``help`` alone when the field has no default value (None).
    """
    head, _, rest = field.partition(".")
    info = cls.model_fields[head]
    if rest:
        return with_default(info.annotation, rest, help)  # type: ignore[arg-type]
    value = info.get_default(call_default_factory=True)
    if value is None or value == []:
        return help
    return f"{help} (default: {_shown(value)})".lstrip()


def _shown(value: Any) -> str:
    """A default as typed on the command line: 0.0005, not 0.00050000001; on/off for flags."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


Data = Annotated[
    str,
    typer.Option(
        "--data",
        help=with_default(
            PruneConfig, "dataset", "digits, cifar10, cifar100, fashion-mnist, mnist, idx, ..."
        ),
    ),
]
DataRoot = Annotated[str, typer.Option(help="folder holding the dataset files")]
BatchSize = Annotated[int, typer.Option(help=with_default(PruneConfig, "batch_size"))]
Seed = Annotated[int, typer.Option(help=with_default(PruneConfig, "seed"))]
Device = Annotated[
    str, typer.Option(help=with_default(PruneConfig, "device", "auto | cpu | cuda | cuda:N"))
]
PerLayerCap = Annotated[
    float,
    typer.Option(help=with_default(PruneConfig, "per_layer_cap", "max fraction removed per layer")),
]
Exclude = Annotated[
    list[str],
    typer.Option(
        "--exclude",
        metavar="NAME",
        help="never prune this module (a name of model.named_modules(); a block excludes its "
        "layers); repeat it or give NAME,NAME",
    ),
]
Fisher = Annotated[str, typer.Option(help=with_default(PruneConfig, "fisher", "true | empirical"))]
FisherBatches = Annotated[int, typer.Option(help="batches for curvature (default: all)")]
Damping = Annotated[
    float,
    typer.Option(help="relative damping of the factors (default: the method's own)"),
]
FinetuneEpochs = Annotated[
    int,
    typer.Option(help=with_default(PruneConfig, "finetune.epochs", "fine-tuning epochs per round")),
]
FinetuneLr = Annotated[
    float, typer.Option(help=with_default(PruneConfig, "finetune.lr", "fine-tuning learning rate"))
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bars")]
RunOut = Annotated[Path, typer.Option(help="run directory to create")]
RunResume = Annotated[Path, typer.Option(help="continue the (killed) run in this directory")]
RunForce = Annotated[bool, typer.Option("--force", help="replace the run in an existing --out")]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="load a legacy torch.save --checkpoint (unpickling runs its code: trust it!); "
        "never stored in the run: give it again with --resume",
    ),
]


def names(option: str, given: list[str] | None) -> list[str] | None:
    """The names of a repeatable, comma-separated option (``--exclude a --exclude b,c``).

    Args:
        option: the option, for the error.
        given: its values as typed (None or empty: not given).

    Returns:
        The names in order, or None when the option was not given.

    Raises:
        ConfigError: an empty name (``--exclude a,,b``).
    """
    if not given:
        return None
    parts = [part.strip() for text in given for part in text.split(",")]
    if not all(parts):
        raise ConfigError(f"{option}: empty name in {','.join(given)!r}; give NAME or NAME,NAME")
    return parts


def _fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """``cls``'s fields as dotted names; a nested config's fields as ``group.field``."""
    names = []
    for name, info in cls.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names += _fields(sub, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def option_of(field: str) -> str:
    """The parameter that sets config ``field`` (``finetune.lr`` -> ``finetune_lr``).

    Args:
        field: a config field, dotted for a nested one.

    Returns:
        The name of the command's parameter (``data`` for ``dataset``).
    """
    return FIELD_OPTIONS.get(field, field)


def flag(field: str) -> str:
    """The option that sets config ``field``, as typed (``finetune.lr`` -> ``--finetune-lr``)."""
    return "--" + option_of(field).replace("_", "-")


def overrides(cls: type[BaseModel], ctx: typer.Context) -> dict[str, Any]:
    """The values of the command's options that set fields of ``cls``.

    Args:
        cls: the config the command builds.
        ctx: the running command's context (its declared options and their values).

    Returns:
        Dotted field name -> value (``None``: not given), in the order the command
        declares its options.
    """
    by_option = {option_of(field): field for field in _fields(cls)}
    return {
        by_option[p.name]: ctx.params[p.name]
        for p in ctx.command.params
        if p.name in by_option and p.name in ctx.params
    }
