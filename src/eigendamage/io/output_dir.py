"""Output directories: refuse a non-empty one unless forced or resuming, lock one so that
two runs never write into it at once, and clean up the temp files a killed write left."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX only: output-directory locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from ..errors import OutputExistsError, OutputInUseError
from .atomic import TEMP_NAME

__all__ = [
    "check_output_dir",
    "lock_output_dir",
    "prepare_output_dir",
    "remove_stale_temp_files",
]


def check_output_dir(path: str | os.PathLike[str], *, force: bool, resume: bool = False) -> Path:
    """Everything :func:`prepare_output_dir` checks, without creating anything.

    Jobs call this before their (slow, fallible) setup and create the directory only once
    the inputs are known to be good, so a failing run leaves nothing behind.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"output path {p} exists and is not a directory")
    if p.is_dir():
        # A run killed while writing its first file leaves only a temp file: still empty.
        if any(not TEMP_NAME.fullmatch(c.name) for c in p.iterdir()) and not (force or resume):
            raise OutputExistsError(
                f"output directory {p} exists; pass --force to overwrite or --resume {p} to "
                "continue"
            )
        return p
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputExistsError(f"cannot create output directory {p}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputExistsError(
            f"cannot create output directory {p}: no write permission in {ancestor}"
        )
    return p


@contextlib.contextmanager
def lock_output_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive OS lock on the existing directory ``path`` while the block runs.

    Why: two runs writing into one directory mix their results and delete each other's
    files; the second one is refused at once instead.  The lock is ``flock`` on the
    directory's own descriptor: it leaves no lock file behind, and the OS releases it when
    the descriptor closes, whatever ends the process (SIGKILL included).  Where ``flock``
    is missing (Windows) or the filesystem refuses it, the run goes ahead unlocked.
    """
    p = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        yield p
        return
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUseError(
                f"output directory {p} is in use: another eigendamage run holds it; wait for "
                "it to finish or choose another --out"
            ) from None
        except OSError:  # pragma: no cover - a filesystem without flock (some network mounts)
            pass
        yield p
    finally:
        os.close(fd)


def prepare_output_dir(path: str | os.PathLike[str], *, force: bool, resume: bool = False) -> Path:
    """Create ``path`` or accept it; refuse a non-empty one unless forced or resuming.

    ``force`` deletes nothing here: callers that know which files belong to a run remove
    those (see ``runner``); anything else in the directory is left alone.
    """
    p = check_output_dir(path, force=force, resume=resume)
    p.mkdir(parents=True, exist_ok=True)
    return p


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that writes killed mid-way (SIGKILL, power loss) left behind.

    Only names of the form atomic writes give their temp files (:data:`.atomic.TEMP_NAME`)
    are touched.
    """
    removed = []
    for tmp in Path(directory).rglob(".*.tmp"):
        if tmp.is_file() and TEMP_NAME.fullmatch(tmp.name):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed
