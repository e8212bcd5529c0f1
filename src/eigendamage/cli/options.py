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

# Config field -> command-line parameter, where the name is not the field's own.
FIELD_OPTIONS = {
    "dataset": "data",
    "finetune.epochs": "finetune_epochs",
    "finetune.lr": "finetune_lr",
}

Data = Annotated[
    str, typer.Option("--data", help="digits, cifar10, cifar100, fashion-mnist, mnist, idx, ...")
]
DataRoot = Annotated[str, typer.Option(help="folder holding the dataset files")]
BatchSize = Annotated[int, typer.Option()]
Seed = Annotated[int, typer.Option()]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
PerLayerCap = Annotated[float, typer.Option(help="max fraction removed per layer side")]
Fisher = Annotated[str, typer.Option(help="true | empirical")]
FisherBatches = Annotated[int, typer.Option(help="batches for curvature (default: all)")]
Damping = Annotated[float, typer.Option(help="relative damping of the factors")]
FinetuneEpochs = Annotated[int, typer.Option(help="fine-tuning epochs per round")]
FinetuneLr = Annotated[float, typer.Option()]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bars")]
RunOut = Annotated[Path, typer.Option(help="run directory to create")]
RunResume = Annotated[Path, typer.Option(help="continue the (killed) run in this directory")]
RunForce = Annotated[bool, typer.Option(help="replace the run in an existing --out")]


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
