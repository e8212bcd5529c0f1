"""Seeds, RNG snapshots and an environment fingerprint.

Reproducibility is a feature of this library: a run is described by its config plus a seed,
a killed training run resumes bit-exactly from a checkpoint (which stores :func:`rng_state`),
and every result file records :func:`environment_info` so numbers can be traced back.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["environment_info", "rng_state", "seed_everything", "set_rng_state"]

_SOURCE = Path(__file__).resolve().parent


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and all CUDA devices).

    ``torch.use_deterministic_algorithms`` is deliberately left alone: forcing it makes some
    GPU kernels raise, and CPU runs are deterministic without it.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    # NumPy's legacy global seed must fit in 32 bits.
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Snapshot every global RNG as tensors/lists/numbers only.

    The result loads under ``torch.load(weights_only=True)``, so checkpoints holding it need no
    arbitrary unpickling.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        # Only when CUDA is in use: querying it would otherwise create a CUDA context.
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs captured by :func:`rng_state` (CUDA only if the device count matches)."""
    py = state["python"]
    internal = tuple(int(v) for v in py["state"].tolist())
    random.setstate((int(py["version"]), internal, py["gauss_next"]))
    npst = state["numpy"]
    keys = np.asarray(npst["keys"].tolist(), dtype=np.uint32)
    np.random.set_state(
        (
            npst["kind"],
            keys,
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].to(dtype=torch.uint8, device="cpu"))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(dtype=torch.uint8, device="cpu") for s in cuda])


def _git(args: list[str], cwd: str | os.PathLike[str]) -> str | None:
    """Output of ``git args`` in ``cwd``, or None when git or the repo is unavailable."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _source_repo(cwd: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """Where to ask git: ``cwd``, or this package's source when git tracks it (an install
    inside some other repo, e.g. a venv in a project, must not report that repo)."""
    if cwd is not None:
        return cwd
    tracked = _git(["ls-files", "--error-unmatch", "__init__.py"], _SOURCE)
    return _SOURCE if tracked else None


def _git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """HEAD of the repo holding this package's source (or ``cwd``), or None: results name
    the code that produced them whatever the working directory."""
    repo = _source_repo(cwd)
    return (_git(["rev-parse", "HEAD"], repo) or None) if repo is not None else None


def _git_dirty(cwd: str | os.PathLike[str] | None = None) -> bool | None:
    """Whether tracked files differ from HEAD (results of uncommitted code), or None."""
    repo = _source_repo(cwd)
    status = None if repo is None else _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return None if status is None else bool(status)


def _package_version() -> str | None:
    try:
        return metadata.version("eigendamage")
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions, platform and hardware, recorded next to results so they can be reproduced."""
    try:
        import torchvision

        tv_version: str | None = torchvision.__version__
    except Exception:  # torchvision is optional at runtime; a broken install must not crash
        tv_version = None
    cuda_device = None
    if torch.cuda.is_available():
        try:
            cuda_device = torch.cuda.get_device_name(0)
        except Exception:
            cuda_device = None
    return {
        "eigendamage": _package_version(),
        "argv": list(sys.argv),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": tv_version,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda_device": cuda_device,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
