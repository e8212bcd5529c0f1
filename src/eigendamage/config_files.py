"""Reading config files that may come from strangers: bounded in size and nesting.

Why a module of its own: the parsers recurse once per nesting level and refuse integers of
over 4300 digits, so a 1 MB file can raise ``RecursionError``/``ValueError`` from deep
inside ``json``/``tomllib``; here every such file is one :class:`ConfigError` naming it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_NESTING", "read_config_file"]

MAX_NESTING = 32  # levels of tables/lists in a config file
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; a bigger file is not one


def _nesting(data: Any) -> int:
    """Depth of tables/lists in parsed config data (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth + 1)
            if deepest > MAX_NESTING:
                break
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse(path: Path, text: str) -> Any:
    """JSON or TOML by suffix.  Parsers recurse per nesting level and refuse integers of
    over 4300 digits: both surface as one ConfigError, not a RecursionError/ValueError."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        kind, errors = "JSON", (json.JSONDecodeError,)
        parse = json.loads
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(
                    f"config {path}: TOML needs Python 3.11+ or `pip install tomli`; "
                    "or use a .json config"
                ) from None
        kind, errors = "TOML", (tomllib.TOMLDecodeError,)
        parse = tomllib.loads
    else:
        raise ConfigError(f"config {path}: unsupported file type {suffix!r}; use .json or .toml")
    try:
        return parse(text)
    except errors as exc:
        raise ConfigError(f"config {path}: invalid {kind}: {exc}") from None
    except RecursionError:
        raise ConfigError(
            f"config {path}: invalid {kind}: nested too deeply (at most {MAX_NESTING} levels)"
        ) from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string ..."
        raise ConfigError(f"config {path}: invalid {kind}: {exc}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a ``.json``/``.toml`` file, read within the limits above."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config {path}: {size:,} bytes is too big for a config file "
                f"(at most {MAX_CONFIG_BYTES:,})"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8 text ({exc})") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a table/object of settings")
    if _nesting(data) > MAX_NESTING:
        raise ConfigError(f"config {path}: nested deeper than {MAX_NESTING} levels")
    return data
