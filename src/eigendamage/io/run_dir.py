"""A run's directory: which files are the run's, who may write them, and what survives a
failure.

* **one run at a time**: rank 0 holds an OS lock on the directory
  (:func:`.output_dir.lock_output_dir`) for the whole run, so a second run on the same
  ``--out`` is refused at once;
* **created late**: the directory is made only once the inputs are validated, and a new
  directory is removed again when the run fails before it saved a checkpoint, whatever the
  failure (a bad option, a full disk, a bug), so bad input leaves nothing behind;
* ``force`` replaces a previous run's own files (:data:`RUN_FILES`) and nothing else, and
  only once the new run has saved work of its own: until then they wait in a hidden
  :data:`PREVIOUS_RUN` folder and come back if the new run fails;
* a prune run records a hash of its ``--checkpoint`` (:data:`SOURCE_FILE`) and ``--resume``
  refuses a changed one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PruneConfig, config_to_dict
from ..distributed import init_from_env, is_main, on_main, only_main
from ..errors import CheckpointError, EigenDamageError, ResourceError
from ..seeding import environment_info
from .architecture import ARCHITECTURE_FILE, WEIGHTS_FILE
from .atomic import atomic_write_json
from .output_dir import check_output_dir, lock_output_dir, remove_stale_temp_files

Log = Callable[[str], None]
ROUNDS_DIR = "rounds"
STATE_FILE = "state.json"
TRAIN_CHECKPOINT = "train_checkpoint.pt"
CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
SOURCE_FILE = "source.json"  # the sha256 of a prune run's --checkpoint, checked on --resume
RUN_FILES = (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    METRICS_FILE,
    MODEL_DIR,
    ROUNDS_DIR,
    TRAIN_CHECKPOINT,
    SOURCE_FILE,
)
# The run files a --force re-run replaces wait here until it has saved work of its own;
# they are moved through SETTING_ASIDE, so that a kill midway is recognised.
PREVIOUS_RUN = ".eigendamage-previous-run"
SETTING_ASIDE = ".eigendamage-previous-run.partial"


def finished_metrics(out: Path) -> dict[str, Any] | None:
    """The metrics of a complete run in ``out`` (written last), or None."""
    path = out / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to redo the run") from exc


def _has_checkpoint(out: Path) -> bool:
    rounds = out / ROUNDS_DIR
    return (out / TRAIN_CHECKPOINT).is_file() or (rounds.is_dir() and any(rounds.iterdir()))


def _has_saved_work(out: Path) -> bool:
    return _has_checkpoint(out) or (out / METRICS_FILE).is_file()


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        _remove(out / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _set_aside(out: Path) -> None:
    """Move the previous run's files (only :data:`RUN_FILES`) into :data:`PREVIOUS_RUN`."""
    names = [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    if not names:
        return
    partial = out / SETTING_ASIDE
    partial.mkdir()
    for name in names:
        os.replace(out / name, partial / name)
    os.replace(partial, out / PREVIOUS_RUN)


def _move_back(kept: Path, out: Path) -> None:
    """Put the run files kept in ``kept`` back into ``out`` and drop ``kept``."""
    for name in RUN_FILES:
        if (kept / name).exists() or (kept / name).is_symlink():
            _remove(out / name)
            os.replace(kept / name, out / name)
    shutil.rmtree(kept)


def _settle_previous_run(out: Path, resume: bool, log: Log) -> None:
    """Settle what a ``--force`` re-run killed outright (SIGKILL, power loss) left behind;
    a run that fails any other way settles it itself (:meth:`Run.started`).  Called with
    the directory locked, so no live run owns these files."""
    partial = out / SETTING_ASIDE
    if partial.is_dir():  # killed while moving the files aside: it had written nothing
        _move_back(partial, out)
        log(f"restored the previous run in {out}: a --force re-run was killed while replacing it")
    kept = out / PREVIOUS_RUN
    if not kept.is_dir():
        return
    if _has_saved_work(out):
        shutil.rmtree(kept)
        log(
            f"removed the previous run in {kept}: the --force re-run that replaced it has "
            "saved work"
        )
    elif resume:  # this run continues the re-run, which inherits the previous run's fate
        log(f"the previous run stays in {kept} until this run saves its first checkpoint")
    else:
        _remove_run_files(out)
        _move_back(kept, out)
        log(
            f"restored the previous run in {out}: the --force re-run that replaced it was "
            "killed before it saved any work"
        )


@dataclass
class Run:
    """A run's hold on its directory: rank 0 locks it for the whole run (``stack`` releases
    the lock) and keeps the run that ``--force`` replaces until this one has saved work."""

    out_dir: Path
    log: Log
    progress: bool
    done: dict[str, Any] | None
    force: bool
    resume: bool
    stack: contextlib.ExitStack
    locked: bool

    @contextlib.contextmanager
    def started(self) -> Iterator[None]:
        """The run directory, created (and locked) only now that the inputs are validated.

        A previous run is set aside, not deleted.  If this run fails before it has saved a
        checkpoint, the previous run comes back; else it is dropped and a user error says
        the work is kept for ``--resume``.  Without a previous run, a directory this run
        created is removed again on a user error.
        """
        if not is_main():  # rank 0 owns the directory; the others only read from it
            yield
            return
        out, created = self.out_dir, False
        if not self.locked:  # it did not exist when the run was claimed
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                out.mkdir()
                created = True
            except FileExistsError:
                pass
            self.stack.enter_context(lock_output_dir(out))
            self.locked = True
            if not created:  # made by another process since: judge it again, locked now
                check_output_dir(out, force=self.force, resume=self.resume)
                _settle_previous_run(out, self.resume, self.log)
        if self.resume:
            remove_stale_temp_files(out)
        elif self.force:
            try:
                _set_aside(out)
            except BaseException:
                if (out / SETTING_ASIDE).is_dir():
                    _move_back(out / SETTING_ASIDE, out)
                raise
        try:
            yield
        except BaseException as exc:
            kept = self._failed(exc, created)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise disk_full_error(exc, kept, out) from exc
            raise
        self.commit()

    def commit(self) -> None:
        """This run has saved work: the run it replaces is gone for good."""
        kept = self.out_dir / PREVIOUS_RUN
        if is_main() and kept.is_dir():
            shutil.rmtree(kept)

    def _failed(self, exc: BaseException, created: bool) -> bool:
        """Settle the directory after ``exc``; True when saved work is kept for ``--resume``."""
        out = self.out_dir
        if _has_checkpoint(out):
            self.commit()
            if isinstance(exc, EigenDamageError):
                exc.args = (f"{exc} (finished work kept: fix the cause and use --resume {out})",)
            return True
        if (out / PREVIOUS_RUN).is_dir():
            _remove_run_files(out)
            _move_back(out / PREVIOUS_RUN, out)
            self.log(f"the previous run in {out} is kept: this run failed before saving any work")
        elif created:  # nothing worth resuming: leave no trace, whatever the failure was
            shutil.rmtree(out, ignore_errors=True)
        return False


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(exc: OSError, kept: bool, out: Path) -> ResourceError:
    """A full disk during a run, as one line: what filled up and whether work is kept."""
    where = f" writing {exc.filename}" if exc.filename else ""
    then = (
        f"finished work kept: free some space and use --resume {out}"
        if kept
        else "nothing was kept: free some space and run again"
    )
    return ResourceError(f"{exc.strerror or 'disk full'}{where}; {then}")


@contextlib.contextmanager
def claimed(out: str | Path, force: bool, resume: bool, log: Log, progress: bool) -> Iterator[Run]:
    """Join torchrun's process group when launched by it (a no-op otherwise); rank 0 alone
    logs, shows progress, judges the output directory and locks it (an existing one at
    once, a new one when :meth:`Run.started` creates it), and every rank gets its verdict.
    The lock is released when the block ends, however it ends."""
    init_from_env()
    log, progress = only_main(log), progress and is_main()
    with contextlib.ExitStack() as stack:

        def claim() -> tuple[Path, bool]:
            out_dir = check_output_dir(out, force=force, resume=resume)
            if not out_dir.is_dir():
                return out_dir, False
            stack.enter_context(lock_output_dir(out_dir))
            _settle_previous_run(out_dir, resume, log)
            return out_dir, True

        out_dir, locked = on_main(claim)
        done = finished_metrics(out_dir) if resume else None
        if done is not None:
            log(f"run {out_dir} is already finished")
        yield Run(out_dir, log, progress, done, force, resume, stack, locked)


def write_run_files(out: Path, cfg: Any, device: torch.device, resume: bool) -> None:
    """``config.json`` once; ``environment.json`` per start (resumes are appended)."""
    env = {**environment_info(), "device": str(device)}
    env_file = out / ENVIRONMENT_FILE
    if resume and env_file.is_file():
        try:
            first = json.loads(env_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            first = {}
        first.setdefault("resumed", []).append(env)
        env = first
    if not resume or not (out / CONFIG_FILE).is_file():
        atomic_write_json(out / CONFIG_FILE, config_to_dict(cfg))
    atomic_write_json(env_file, env)


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a checkpoint's content: a model directory's architecture and weights,
    or a file's bytes (read in chunks).  Each file enters with its name and size."""
    p = Path(path)
    if p.is_file() and p.name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
        p = p.parent
    digest = hashlib.sha256()
    for f in [p / ARCHITECTURE_FILE, p / WEIGHTS_FILE] if p.is_dir() else [p]:
        with f.open("rb") as fh:
            digest.update(f"{f.name}\0{os.fstat(fh.fileno()).st_size}\0".encode())
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def source_digest(cfg: PruneConfig, out_dir: Path, resume: bool, log: Log) -> str | None:
    """The --checkpoint's hash; on ``--resume`` it must be the one the run started from,
    else the "before" metrics and the rounds would mix two models."""
    if cfg.checkpoint is None:
        return None
    digest = checkpoint_sha256(cfg.checkpoint)
    record = out_dir / SOURCE_FILE
    if not resume:
        return digest
    if not record.is_file():
        log(
            f"warning: {out_dir} has no {SOURCE_FILE} (an older run): cannot check that "
            f"{cfg.checkpoint} is unchanged; recording it now"
        )
        return digest
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{record} is unreadable ({exc}); delete it to resume without checking --checkpoint"
        ) from exc
    if recorded != digest:
        raise CheckpointError(
            f"checkpoint {cfg.checkpoint} changed since run {out_dir} started from it (sha256 "
            f"{digest[:12]}..., recorded {str(recorded)[:12]}...); put the original back to "
            "resume, or start a new run with --out"
        )
    return digest
