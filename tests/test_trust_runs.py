"""Trust and faults of run directories (issue 12): pickle loading only from the command line,
``--force`` that never loses the previous run, one run per directory (an OS lock), a
``--resume`` that refuses a replaced checkpoint, and an ``export`` that never writes through
a link.

Code execution is checked with a harmless payload: a pickle whose loading creates a
directory, which must never appear.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from eigendamage import compare, demo, runner
from eigendamage.cli import main
from eigendamage.io import load_model_file, save_model
from eigendamage.io import load_or_create as create_model

PRUNE = ["--method", "eigendamage", "--ratio", "0.3", "--finetune-epochs", "0",
         "--fisher-batches", "2", "--batch-size", "256", "--device", "cpu",
         "--no-progress"]  # fmt: skip
POSIX = sys.platform != "win32"  # output-directory locks need flock
BUDGETS = {"prune": {"method": "l1", "ratio": 0.3}, "compare": {"methods": ["l1"], "ratios": [0.3]}}


class MakeDir:
    """Unpickling this calls ``os.mkdir(path)``: a stand-in for a malicious payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def _small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("digits-vgg", widths=(8, "M", 16), seed=seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(_small_model(), path)
    return path


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, Path]:
    """(a pickle that creates ``marker`` when loaded, ``marker``)."""
    evil, marker = tmp_path / "evil.pt", tmp_path / "PAYLOAD_RAN"
    torch.save(MakeDir(marker), evil)
    return evil, marker


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, f"expected one error line on stderr, got {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def _interrupt_at_round(monkeypatch: pytest.MonkeyPatch, round_index: int) -> None:
    """Ctrl-C right after round ``round_index`` is saved (before it is recorded as done)."""
    record = runner._round_record

    def interrupted(info: Any, *args: Any) -> dict[str, Any]:
        if info.round == round_index:
            raise KeyboardInterrupt
        return record(info, *args)

    monkeypatch.setattr(runner, "_round_record", interrupted)


# --------------------------------------------------------------------------- 1: pickle


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_a_config_file_cannot_allow_pickle(
    command: str, payload: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil, marker = payload
    budget = BUDGETS[command]
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"checkpoint": str(evil), "allow_pickle": True, **budget}))
    out = tmp_path / "out"
    assert main([command, "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    assert not marker.exists(), "the checkpoint was unpickled: a config file allowed it"
    line = _one_error_line(capsys.readouterr().err)
    assert "allow_pickle cannot be set in a file" in line and "--allow-pickle" in line
    assert not out.exists()


def test_a_resumed_run_config_cannot_allow_pickle(
    payload: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run directory someone hands over (its config.json) must not switch pickle on."""
    evil, marker = payload
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"checkpoint": str(evil), "allow_pickle": True, "method": "l1", "ratio": 0.3,
           "device": "cpu", "fisher_batches": 2}  # fmt: skip
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["prune", "--resume", str(run), "--no-progress"]) == 2
    assert not marker.exists(), "the checkpoint was unpickled: config.json allowed it"
    line = _one_error_line(capsys.readouterr().err)
    assert f"--resume {run}" in line and "allow_pickle cannot be set in a file" in line


def test_allow_pickle_warns_is_never_stored_and_is_given_again_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    whole, out = tmp_path / "whole.pt", tmp_path / "run"
    torch.save(_small_model(), whole)
    warning = f"warning: --allow-pickle: unpickling {whole} runs any code it holds"
    args = ["prune", "--checkpoint", str(whole), "--allow-pickle", *PRUNE, "--rounds", "2"]
    _interrupt_at_round(monkeypatch, 2)
    assert main([*args, "--out", str(out)]) == 130
    assert warning in capsys.readouterr().err
    assert "allow_pickle" not in json.loads((out / "config.json").read_text())
    monkeypatch.undo()
    # the resumed run loads the checkpoint again: only with the flag typed again
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 2
    assert "--allow-pickle" in _one_error_line(capsys.readouterr().err)
    assert main(["prune", "--resume", str(out), "--allow-pickle", "--no-progress"]) == 0
    assert warning in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["round"] == 2


def test_python_api_warns_when_it_unpickles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(_small_model(), whole)
    with caplog.at_level(logging.WARNING, logger="eigendamage"):
        load_model_file(whole, allow_pickle=True)
    assert f"unpickling {whole} runs any code it holds" in caplog.text


# --------------------------------------------------------------------------- 3: --force


def _first_run(checkpoint: Path, out: Path) -> dict[str, bytes | None]:
    assert main(["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    return _snapshot(out)


@pytest.mark.parametrize("failure", ["unreachable-target", "ctrl-c"])
def test_a_failed_force_rerun_keeps_the_previous_run(
    failure: str,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    before = _first_run(checkpoint, out)
    assert {"metrics.json", "config.json", "model/model.safetensors"} <= before.keys()
    args = ["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(out), "--force"]
    if failure == "ctrl-c":

        def interrupted(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(runner, "run_pruning", interrupted)
        assert main(args) == 130
    else:
        args[args.index("--ratio") : args.index("--ratio") + 2] = ["--target-params", "0.001"]
        assert main(args) == 2
        assert "unreachable" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(out) == before, "the failed re-run changed the previous run's files"
    if POSIX:
        assert not _locked_elsewhere(out)  # released by the failed run


def test_force_rerun_replaces_only_once_it_has_work(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = _first_run(checkpoint, out)
    args = ["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(out), "--force"]
    assert main([*args, "--ratio", "0.5"]) == 0
    after = _snapshot(out)
    assert after["notes.txt"] == b"mine"
    assert after["metrics.json"] != before["metrics.json"]
    assert not [p for p in after if p.startswith(".")], "the set-aside previous run remained"


@pytest.mark.parametrize("killed", ["while-setting-aside", "before-first-checkpoint"])
def test_a_killed_force_rerun_is_settled_by_the_next_run(
    killed: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What SIGKILL leaves behind (no handler runs) is restored by the next run."""
    out = tmp_path / "run"
    before = _first_run(checkpoint, out)
    partial = out / runner.SETTING_ASIDE
    partial.mkdir()
    os.replace(out / "model", partial / "model")
    if killed == "before-first-checkpoint":  # finished moving; wrote its first files
        for name in runner.RUN_FILES:
            if (out / name).exists():
                os.replace(out / name, partial / name)
        os.replace(partial, out / runner.PREVIOUS_RUN)
        (out / "config.json").write_text("{}")
        (out / "environment.json").write_text("{}")
    args = ["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(out), "--force",
            "--target-params", "0.001"]  # fmt: skip
    args.remove("--ratio")
    args.remove("0.3")
    assert main(args) == 2
    assert f"restored the previous run in {out}" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_a_killed_force_rerun_with_saved_work_replaces_the_previous_run(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _first_run(checkpoint, out)
    kept = out / runner.PREVIOUS_RUN
    kept.mkdir()
    for name in runner.RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, kept / name)
    (out / "config.json").write_text("{}")
    (out / "rounds").mkdir()
    (out / "rounds" / "finetune_1.pt").write_bytes(b"the re-run's checkpoint")
    assert main(["prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(out),
                 "--force", "--rounds", "1"]) == 0  # fmt: skip
    assert f"removed the previous run in {kept}" in capsys.readouterr().out
    assert not kept.exists() and (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- 4: one run


TRY_LOCK = """
import fcntl, os, sys
fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
"""
HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def locked_out(tmp_path: Path) -> Iterator[Path]:
    """An existing run directory that another process holds locked."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "config.json").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    yield out
    holder.communicate(timeout=30)


def _locked_elsewhere(path: Path) -> bool:
    """Whether another process finds ``path`` locked."""
    tried = subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)], capture_output=True)
    assert tried.returncode == 0 or "BlockingIOError" in tried.stderr.decode(), tried.stderr
    return tried.returncode != 0


def _fail_if_called(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the run started although another run holds the directory")


@pytest.mark.skipif(not POSIX, reason="flock is POSIX")
@pytest.mark.parametrize("command", ["train", "prune", "compare", "demo"])
def test_a_second_run_on_a_locked_directory_is_refused_at_once(
    command: str,
    locked_out: Path,
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for module, name in [(runner, "make_loaders"), (compare, "run_train"),
                         (compare, "run_prune"), (demo, "run_train")]:  # fmt: skip
        monkeypatch.setattr(module, name, _fail_if_called)
    args = {
        "train": ["--model", "tiny-mlp", "--epochs", "1"],
        "prune": ["--checkpoint", str(checkpoint), *PRUNE],
        "compare": ["--checkpoint", str(checkpoint), "--methods", "l1", "--ratios", "0.3"],
        "demo": [],
    }[command]
    before = _snapshot(locked_out)
    assert main([command, *args, "--out", str(locked_out), "--force", "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(locked_out) in line and "another eigendamage run holds it" in line
    assert _snapshot(locked_out) == before


@pytest.mark.skipif(not POSIX, reason="flock is POSIX")
def test_a_run_holds_its_directory_locked_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked by another process from inside a running train (a new directory, locked
    when it is created)."""
    out, seen = tmp_path / "run", []
    real_train = runner.train

    def train(*args: Any, **kwargs: Any) -> Any:
        seen.append(_locked_elsewhere(out))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", train)
    args = ["train", "--model", "tiny-mlp", "--epochs", "1", "--batch-size", "256",
            "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0 and seen == [True]
    assert not _locked_elsewhere(out)  # released at the end


# --------------------------------------------------------------------------- 5: resume


def test_resume_refuses_a_replaced_checkpoint(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, original, out = tmp_path / "model", tmp_path / "original", tmp_path / "run"
    shutil.copytree(checkpoint, source)
    shutil.copytree(checkpoint, original)
    _interrupt_at_round(monkeypatch, 2)
    args = ["prune", "--checkpoint", str(source), *PRUNE, "--rounds", "2", "--out", str(out)]
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    state = (out / "rounds" / "state.json").read_bytes()
    save_model(_small_model(seed=1), source)  # same architecture, other weights
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"checkpoint {source} changed" in line
    assert (out / "rounds" / "state.json").read_bytes() == state
    assert not (out / "metrics.json").exists()
    shutil.rmtree(source)
    shutil.copytree(original, source)  # the original back: the run continues
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0


# --------------------------------------------------------------------------- 7: export


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(create_model("tiny-mlp"), path)
    return path


def test_export_replaces_a_dangling_link_instead_of_writing_through_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "elsewhere").mkdir()
    target, out = tmp_path / "elsewhere" / "target.pt2", tmp_path / "m.pt2"
    out.symlink_to(target)
    args = ["export", "--format", "pt2", str(tiny_model_dir), str(out), "--force"]
    assert main(args) == 0
    assert not target.exists(), "export wrote through the link"
    assert out.is_file() and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "m.pt2"]  # no temp files
    # without --force a dangling link counts as something at OUT, like any file
    other = tmp_path / "other.pt2"
    other.symlink_to(target)
    assert main(["export", "--format", "pt2", str(tiny_model_dir), str(other)]) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err)
    assert not target.exists()


def test_large_onnx_weights_are_named_after_the_final_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eigendamage import export

    monkeypatch.setattr(export, "ONNX_EXTERNAL_DATA_BYTES", 0)  # every model is "large"
    model = create_model(str(tiny_model_dir)).eval()
    out = export.export_model(model, tmp_path / "m.onnx", export.trace_input(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert export.max_abs_diff(model, out, export.trace_input(model, 3)) < 1e-4
