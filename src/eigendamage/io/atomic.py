"""Atomic files: every writer goes through a temp file in the target directory, ``fsync``
and ``os.replace``.

Why: a run killed mid-write (Ctrl-C, OOM, preemption) must never leave a truncated result
or checkpoint that a later ``--resume`` trusts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "TEMP_NAME",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "new_file_mode",
    "to_json",
]

TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # the names _atomic_target uses


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and ``os.replace`` it over
    ``path``, on failure delete it.  Same directory => same filesystem => atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        # Writers may have closed the file already; reopen to fsync the data to disk
        # (read-write: Windows refuses to flush a read-only descriptor).
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno and not exc.filename:  # a write to an fd: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every OS/filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file_mode(directory: Path) -> int:
    """The permission bits a new file in ``directory`` gets (0o666 less the umask), for
    writers that create files their own way (safetensors writes 0600).  A probe file, not
    ``os.umask``: that sets the process-wide umask, racing other threads."""
    probe = directory / f".mode.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one."""
    with _atomic_target(path) as tmp:
        # O_EXCL: never clobber a stranger's file; 0o666 so the umask decides permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomic text write (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    """Make the values our results actually contain JSON-serializable."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def to_json(obj: Any, *, sort_keys: bool = True) -> str:
    """Canonical JSON text (sorted keys, indent 2, trailing newline) used for all outputs."""
    return json.dumps(obj, sort_keys=sort_keys, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True) -> Path:
    """Atomic JSON write; numpy/torch scalars, paths and dataclasses are converted.

    ``sort_keys=False`` is for documents whose key order means something (the children of an
    ``nn.Sequential`` in ``architecture.json`` run in that order).
    """
    return atomic_write_text(path, to_json(obj, sort_keys=sort_keys))


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` through a temp file, so a crash never leaves a truncated checkpoint.

    Serialized in memory first: torch's zip writer reports a full disk as an opaque
    ``RuntimeError`` ("unexpected pos ..."), a plain write as ``OSError(ENOSPC)``."""
    buffer = BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
