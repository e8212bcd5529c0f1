"""Configs from JSON/TOML files plus command-line overrides, validated at once; every
validation problem becomes one :class:`~eigendamage.errors.ConfigError` line naming the
file, the dotted field and the reason."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..config_files import read_config_file
from ..errors import ConfigError

C = TypeVar("C", bound=BaseModel)


# --------------------------------------------------------------------------- errors


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _fields_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for did-you-mean hints."""
    cls: Any = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def format_validation_error(
    exc: ValidationError,
    source: str,
    model_cls: type[BaseModel],
    *,
    data: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
) -> str:
    """All of pydantic's errors on one line: ``source: field.path: message (got value)``.

    Args:
        exc: pydantic's error.
        source: where the values came from (``config FILE``, ``command line``).
        model_cls: the config validated.
        data: the raw values validated; the rules across fields (the model's
            ``whole_problems``), which pydantic skips while a field is invalid, are then
            listed too.
        options: dotted field -> the option that sets it (``--method``): a missing field
            with an option is named as ``--method is required``, with the accepted names
            where the config lists them (invalid values keep the field's name, which is
            also the key of a config file).

    Returns:
        The message, without a line break.
    """
    options = options or {}
    parts = []
    errors = exc.errors()
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            close = difflib.get_close_matches(key, _fields_at(model_cls, loc[:-1]), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{_loc(loc[:-1])}: " if len(loc) > 1 else ""
            parts.append(f"{where}unknown key {key!r}{hint}")
            continue
        option = options.get(_loc(loc)) if loc else None
        if err["type"] == "missing" and option is not None:
            choices = getattr(model_cls, "choices", lambda _: [])(_loc(loc))
            one_of = f" (one of: {', '.join(choices)})" if choices else ""
            parts.append(f"{option} is required{one_of}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{_loc(loc)}: " if loc else ""
        got = "" if err["type"] == "missing" or not loc else f" (got {_got(err.get('input'))})"
        parts.append(f"{where}{msg}{got}")
    if data is not None and all(err["loc"] for err in errors):  # the whole-model rules skipped
        parts += getattr(model_cls, "whole_problems", lambda _: [])(data)
    return f"{source}: " + "; ".join(parts)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, model_cls: type[C]) -> C:
    """Read and validate a ``.json`` or ``.toml`` config into ``model_cls``."""
    p = Path(path)
    data = read_config_file(p)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, f"config {p}", model_cls, data=data)
        raise ConfigError(message) from None


def _with_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every given (not None) override set; paths become strings."""
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(data, key, os.fspath(value) if isinstance(value, os.PathLike) else value)
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        data[key] = value
        return
    sub = data.setdefault(head, {})
    if sub is None:
        sub = data[head] = {}
    if not isinstance(sub, dict):
        raise ConfigError(f"option {key}: {head!r} is not a group of settings")
    _set_dotted(sub, rest, value)


def merge_overrides(cfg: C, overrides: Mapping[str, Any]) -> C:
    """Apply command-line overrides (``None`` = not given; ``finetune.lr`` reaches nested
    fields) and validate the result again, so options obey the same rules as files."""
    try:
        return type(cfg).model_validate(_with_overrides(cfg.model_dump(), overrides))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "options", type(cfg))) from None


def build_config(
    model_cls: type[C],
    path: str | Path | None,
    overrides: Mapping[str, Any],
    *,
    options: Mapping[str, str] | None = None,
) -> C:
    """The config a command runs with: the file (if any) with the command-line values on top.

    Validated once, after merging, so options can complete a partial file (a file without
    ``method`` plus ``--method``); errors name the source of the offending values, and all
    of them at once.

    Args:
        model_cls: the config to build.
        path: a JSON/TOML file, or None.
        overrides: dotted field -> value (None: not given).
        options: dotted field -> the option that sets it (``--method``), for the fields a
            command has an option for: a missing one is then named by its option.

    Returns:
        The validated config.

    Raises:
        ConfigError: one line naming every problem.
    """
    data = _with_overrides(read_config_file(Path(path)) if path is not None else {}, overrides)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        if path is None:
            source = "command line"
        else:
            mixed = any(v is not None for v in overrides.values())
            source = f"config {path}" + (" with command-line options" if mixed else "")
        message = format_validation_error(exc, source, model_cls, data=data, options=options)
        raise ConfigError(message) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain JSON-able dict (stored next to results so a run can be repeated)."""
    return cfg.model_dump(mode="json")
