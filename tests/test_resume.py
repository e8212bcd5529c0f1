"""Kill runs with SIGKILL at their checkpoint boundaries, resume them, and demand results
bit-identical to an uninterrupted run: the promise ``--resume DIR`` makes (CPU, fixed seed).

The killed runs are separate processes running the CLI (forked from one pre-imported
process); the reference and the last resume run in-process.  Everything runs single-threaded, in
the subprocesses too, so that every run uses the same CPU kernels and thread split.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from eigendamage.cli import main
from eigendamage.data import make_loaders
from eigendamage.io import save_model
from eigendamage.models import create_model
from eigendamage.seeding import seed_everything
from eigendamage.train import train

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PRUNE = [
    "--method", "eigendamage", "--rounds", "3", "--ratio", "0.3", "--finetune-epochs", "2",
    "--fisher-batches", "2", "--batch-size", "128", "--device", "cpu", "--seed", "3",
    "--no-progress",
]  # fmt: skip
TRAIN = [
    "--model", "digits-vgg", "--epochs", "3", "--lr", "0.05", "--batch-size", "128",
    "--schedule", "cosine", "--device", "cpu", "--seed", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(zygote: Zygote, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits-vgg trained for a few epochs (registry kwargs survive save/load)."""
    seed_everything(0)
    model = create_model("digits-vgg", widths=(8, 8, "M", 16, 16))
    loaders = make_loaders("digits", batch_size=64, seed=0)
    train(model, loaders.train, epochs=3, lr=0.05, schedule="cosine", progress=False)
    path = tmp_path_factory.mktemp("trained") / "model"
    save_model(model, path)
    return path


# A "zygote" process imports the package once and forks one child per CLI run (the test
# SIGKILLs the child): interpreter start-ups, slow here, are paid once instead of per run.
ZYGOTE = """
import json, os, sys
from eigendamage.cli import main
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the zygote's channel
        try:
            code = main(json.loads(line))
        finally:
            os._exit(locals().get("code", 1))
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """Runs ``eigendamage ARGS`` in forked children of one pre-imported process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            env={**os.environ, **ONE_THREAD},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def run(self, *args: str, kill: Callable[[], bool], timeout: float = 300) -> int:
        """Run ``eigendamage ARGS``; SIGKILL it once ``kill()`` is true. The exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(list(args)) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        deadline = time.monotonic() + timeout
        while not kill() and time.monotonic() < deadline:
            time.sleep(0.002)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return int(self.proc.stdout.readline())

    def run_and_kill_when(self, path: Path, *args: str) -> None:
        """Run ``eigendamage ARGS``; SIGKILL it as soon as ``path`` exists."""
        code = self.run(*args, kill=path.exists)
        assert path.exists(), f"{path} did not appear (run exited with {code})"
        assert code == -signal.SIGKILL, f"the run ended (exit {code}) before it could be killed"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


def _without_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _assert_same_result(run: Path, reference: Path) -> None:
    """Same metrics (timings aside), same architecture and bit-identical weights."""
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (run, reference)]
    assert _without_timings(metrics[0]) == _without_timings(metrics[1])
    arch = [(d / "model" / "architecture.json").read_text() for d in (run, reference)]
    assert arch[0] == arch[1]
    got, want = (load_file(str(d / "model" / "model.safetensors")) for d in (run, reference))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert torch.equal(got[key], want[key]), key
    assert not list(run.rglob("*.tmp")), "a killed write left a temp file behind"


def test_prune_killed_at_every_boundary_resumes_bit_identical(
    zygote: Zygote, checkpoint: Path, tmp_path: Path
) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(reference)]) == 0
    # One run, killed again and again: right after it starts writing, mid fine-tuning of
    # round 1, while round 1's model is being saved, at round 2; every resume is killed too.
    fresh = ["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(run)]
    zygote.run_and_kill_when(run / "config.json", *fresh)
    for point in ("rounds/finetune_1.pt", "rounds/round_1", "rounds/round_2"):
        zygote.run_and_kill_when(run / point, "prune", "--resume", str(run), "--no-progress")
    assert main(["prune", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_result(run, reference)
    state = json.loads((run / "rounds" / "state.json").read_text())
    assert state["finished_rounds"] == 3 and len(state["rounds"]) == 3
    assert not list(run.glob("rounds/finetune_*.pt"))  # removed once their round is saved
    env = json.loads((run / "environment.json").read_text())
    assert len(env["resumed"]) >= 3 and env["device"] == "cpu"


def test_train_killed_mid_run_resumes_bit_identical(zygote: Zygote, tmp_path: Path) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *TRAIN, "--out", str(reference)]) == 0
    zygote.run_and_kill_when(run / "train_checkpoint.pt", "train", *TRAIN, "--out", str(run))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _assert_same_result(run, reference)


def test_resume_of_a_finished_run_changes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "done"
    args = ["prune", "--checkpoint", str(checkpoint), "--method", "l1", "--ratio", "0.2",
            "--finetune-epochs", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.slow
def test_prune_killed_at_random_moments_resumes_bit_identical(
    zygote: Zygote, checkpoint: Path, tmp_path: Path
) -> None:
    """SIGKILL at arbitrary moments (mid-write included), resume until the run finishes."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(reference)]) == 0
    rng = random.Random(0)
    args = ["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(run)]
    for _ in range(8):
        deadline = time.monotonic() + rng.uniform(0.1, 4.0)
        if zygote.run(*args, kill=lambda t=deadline: time.monotonic() > t) == 0:
            break
        if (run / "config.json").is_file():  # killed before that: start afresh again
            args = ["prune", "--resume", str(run), "--no-progress"]
    assert main(args) == 0
    _assert_same_result(run, reference)
