"""Bad input through the CLI: one ``error:`` line naming the offending thing, exit code 2, no
traceback, and nothing written or overwritten.

The table runs in-process through :func:`eigendamage.cli.main` (the function behind the
installed script and ``python -m eigendamage``); two subprocesses check those entry points.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from eigendamage import runner
from eigendamage.cli import main
from eigendamage.curvature.factors import KFactors
from eigendamage.curvature.stability import (
    SingularFactorError,
    stable_eigendecompose,
    with_damping_escalation,
)
from eigendamage.errors import CurvatureError, ModelError
from eigendamage.io import load_model_file, save_model
from eigendamage.models import create_model

BUDGET = ["--method", "eigendamage", "--ratio", "0.3", "--finetune-epochs", "0", "--device", "cpu"]
TRAIN = ["--model", "digits-vgg", "--epochs", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model files the table points at; each test copies them into its own tmp dir."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = create_model("digits-vgg", widths=(4, "M", 8))
    save_model(small, root / "ckpt")
    torch.save(small, root / "whole.pt")
    torch.save(small.state_dict(), root / "state.pt")
    save_model(create_model("tiny-mlp", hidden=()), root / "no_prunable")
    save_model(create_model("tiny-mlp", image_size=4), root / "wrong_input")
    save_model(create_model("digits-vgg", num_classes=100, widths=(4, "M", 8)), root / "c100")
    broken = create_model("digits-vgg", widths=(4, "M", 8))
    with torch.no_grad():
        broken.features[0].weight.fill_(float("nan"))
    save_model(broken, root / "nan")
    return root


# --------------------------------------------------------------------------- setups


def _garbage(path: Path, data: bytes = b"\x80\x04garbage") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def cifar_corrupt(tmp: Path) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _garbage(tmp / "cifar" / "cifar-10-batches-py" / name)


def cifar_truncated_archive(tmp: Path) -> None:
    _garbage(tmp / "cifar" / "cifar-10-python.tar.gz", b"\x1f\x8b\x08truncated")


def cifar_empty(tmp: Path) -> None:
    (tmp / "cifar").mkdir()


def images_flat(tmp: Path) -> None:
    _garbage(tmp / "imgs" / "a.png")


def images_corrupt(tmp: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(4):
            _garbage(tmp / "imgs" / "train" / cls / f"{i}.png", b"not a png")


def tiny_imagenet_empty(tmp: Path) -> None:
    (tmp / "tiny").mkdir()


def config_files(tmp: Path) -> None:
    (tmp / "typo.json").write_text(json.dumps({"model": "digits-vgg", "lrr": 0.1}))
    (tmp / "type.toml").write_text('model = "digits-vgg"\nepochs = "3"\n')
    (tmp / "broken.json").write_text("{")
    (tmp / "c.yaml").write_text("model: digits-vgg")
    (tmp / "prune.json").write_text(
        json.dumps({"model": "digits-vgg", "method": "eigendamage", "ratio": 0.3, "fintune": {}})
    )


def existing_out(tmp: Path) -> None:
    _garbage(tmp / "out" / "notes.txt", b"precious")
    _garbage(tmp / "file", b"x")


def not_a_run(tmp: Path) -> None:
    _garbage(tmp / "notrun" / "x.txt", b"x")


def a_prune_run(tmp: Path) -> None:
    (tmp / "prun").mkdir()
    (tmp / "prun" / "config.json").write_text(
        json.dumps({"model": "digits-vgg", "method": "eigendamage", "ratio": 0.3})
    )


def a_train_run(tmp: Path) -> None:
    (tmp / "trun").mkdir()
    (tmp / "trun" / "config.json").write_text(json.dumps({"model": "digits-vgg"}))


def corrupt_state(tmp: Path) -> None:
    a_prune_run(tmp)
    _garbage(tmp / "prun" / "rounds" / "state.json", b"{oops")


def corrupt_weights(tmp: Path) -> None:
    (tmp / "ckpt" / "model.safetensors").write_bytes(b"garbage")


def corrupt_architecture(tmp: Path) -> None:
    (tmp / "ckpt" / "architecture.json").write_text("{not json")


def unknown_layer_type(tmp: Path) -> None:
    doc = json.loads((tmp / "ckpt" / "architecture.json").read_text())
    doc["modules"]["features.0"] = {"type": "Warp2d", "args": {}}
    (tmp / "ckpt" / "architecture.json").write_text(json.dumps(doc))


def nothing(tmp: Path) -> None:
    pass


# --------------------------------------------------------------------------- the table

# (id, args, setup, exit code, fragments the one error line must contain)
CASES: list[tuple[str, list[str], Callable[[Path], None], int, list[str]]] = [
    ("unknown-model", ["train", "--model", "digits-vgj", "--out", "o"], nothing, 2,
     ["unknown model 'digits-vgj'", "Did you mean 'digits-vgg'"]),
    ("unknown-dataset", ["train", *TRAIN, "--data", "cifar11", "--out", "o"], nothing, 2,
     ["unknown dataset 'cifar11'", "'cifar10'"]),
    ("data-root-missing", ["train", *TRAIN, "--data", "cifar10", "--data-root", "nope",
     "--out", "o"], nothing, 2, ["data root", "nope does not exist"]),
    ("data-root-not-given", ["train", *TRAIN, "--data", "cifar10", "--out", "o"], nothing, 2,
     ["pass --data-root"]),
    ("data-wrong-layout", ["train", *TRAIN, "--data", "cifar10", "--data-root", "cifar",
     "--out", "o"], cifar_empty, 2, ["no CIFAR-10 data in", "/cifar"]),
    ("data-corrupt-file", ["train", *TRAIN, "--data", "cifar10", "--data-root", "cifar",
     "--out", "o"], cifar_corrupt, 2, ["corrupt or truncated", "data_batch_1"]),
    ("data-truncated-archive", ["train", *TRAIN, "--data", "cifar10", "--data-root", "cifar",
     "--out", "o"], cifar_truncated_archive, 2, ["cannot read archive", "cifar-10-python.tar.gz"]),
    ("imagefolder-layout", ["train", *TRAIN, "--data", "imagefolder", "--data-root", "imgs",
     "--out", "o"], images_flat, 2, ["no image folder layout in", "/imgs"]),
    ("imagefolder-corrupt-image", ["train", *TRAIN, "--data", "imagefolder", "--data-root",
     "imgs", "--out", "o"], images_corrupt, 2, ["cannot read image file", ".png"]),
    ("tiny-imagenet-layout", ["train", *TRAIN, "--data", "tiny-imagenet", "--data-root", "tiny",
     "--out", "o"], tiny_imagenet_empty, 2, ["no Tiny-ImageNet data in", "/tiny"]),
    ("config-unknown-key", ["train", "--config", "typo.json", "--out", "o"], config_files, 2,
     ["typo.json", "unknown key 'lrr'", "did you mean 'lr'"]),
    ("config-wrong-type", ["train", "--config", "type.toml", "--out", "o"], config_files, 2,
     ["type.toml", "epochs: Input should be a valid integer"]),
    ("config-nested-unknown-key", ["prune", "--config", "prune.json", "--out", "o"],
     config_files, 2, ["prune.json", "unknown key 'fintune'", "did you mean 'finetune'"]),
    ("config-missing", ["train", "--config", "nope.json", "--out", "o"], nothing, 2,
     ["nope.json", "file not found"]),
    ("config-invalid-json", ["train", "--config", "broken.json", "--out", "o"], config_files, 2,
     ["broken.json", "invalid JSON"]),
    ("config-suffix", ["train", "--config", "c.yaml", "--out", "o"], config_files, 2,
     ["c.yaml", "use .json or .toml"]),
    ("epochs-negative", ["train", *TRAIN, "--epochs", "-1", "--out", "o"], nothing, 2,
     ["epochs: Input should be greater than or equal to 0"]),
    ("lr-not-a-number", ["train", *TRAIN, "--lr", "fast", "--out", "o"], nothing, 2,
     ["Invalid value for '--lr'"]),
    ("unknown-option", ["prune", "--ratoi", "0.3", "--out", "o"], nothing, 2,
     ["No such option: --ratoi"]),
    ("device-cuda-missing", ["train", "--model", "digits-vgg", "--device", "cuda", "--out", "o"],
     nothing, 2, ["'cuda'", "CUDA is not available", "--device cpu"]),
    ("device-unknown", ["train", "--model", "digits-vgg", "--device", "gpu", "--out", "o"],
     nothing, 2, ["device: not a device name", "'gpu'"]),
    ("out-exists", ["train", *TRAIN, "--out", "out"], existing_out, 2,
     ["output directory out exists", "--force", "--resume out"]),
    ("out-is-a-file", ["train", *TRAIN, "--out", "file"], existing_out, 2,
     ["file exists and is not a directory"]),
    ("out-under-a-file", ["train", *TRAIN, "--out", "file/run"], existing_out, 2,
     ["file/run", "is a file"]),
    ("out-missing", ["train", "--model", "digits-vgg"], nothing, 2, ["--out DIR is required"]),
    ("resume-not-a-run", ["train", "--resume", "notrun"], not_a_run, 2,
     ["--resume notrun", "no run found there"]),
    ("resume-missing-dir", ["prune", "--resume", "gone"], nothing, 2,
     ["--resume gone", "no run found there"]),
    ("resume-wrong-kind", ["train", "--resume", "prun"], a_prune_run, 2,
     ["--resume prun", "not a `train` run"]),
    ("resume-with-options", ["train", "--resume", "trun", "--epochs", "5", "--force"],
     a_train_run, 2, ["--resume trun", "drop --epochs, --force"]),
    ("resume-corrupt-state", ["prune", "--resume", "prun", "--no-progress"], corrupt_state, 2,
     ["state.json is unreadable", "rounds"]),
    ("unknown-method", ["prune", "--checkpoint", "ckpt", "--method", "eigendamag", "--ratio",
     "0.3", "--out", "o"], nothing, 2, ["unknown method 'eigendamag'", "'eigendamage'"]),
    ("ratio-out-of-range", ["prune", "--checkpoint", "ckpt", "--method", "l1", "--ratio", "1.5",
     "--out", "o"], nothing, 2, ["ratio: Input should be less than 1", "1.5"]),
    ("ratio-not-a-number", ["prune", "--checkpoint", "ckpt", "--method", "l1", "--ratio", "abc",
     "--out", "o"], nothing, 2, ["Invalid value for '--ratio'"]),
    ("two-budgets", ["prune", "--checkpoint", "ckpt", "--method", "l1", "--ratio", "0.3",
     "--target-params", "0.5", "--out", "o"], nothing, 2, ["exactly one of ratio", "got ratio"]),
    ("no-budget", ["prune", "--checkpoint", "ckpt", "--method", "l1", "--out", "o"], nothing, 2,
     ["exactly one of ratio, target_params, target_flops (got none)"]),
    ("fisher-unknown", ["prune", "--checkpoint", "ckpt", *BUDGET, "--fisher", "exact",
     "--out", "o"], nothing, 2, ["fisher: Input should be 'true' or 'empirical'"]),
    ("target-unreachable", ["prune", "--checkpoint", "ckpt", "--method", "eigendamage",
     "--target-params", "0.001", "--finetune-epochs", "0", "--device", "cpu", "--no-progress",
     "--out", "o"], nothing, 2, ["unreachable", "per_layer_cap"]),
    ("weight-method-with-budget", ["prune", "--checkpoint", "ckpt", "--method", "obd",
     "--target-params", "0.5", "--finetune-epochs", "0", "--device", "cpu", "--no-progress",
     "--out", "o"], nothing, 2, ["obd is weight-level", "give a ratio"]),
    ("checkpoint-missing", ["prune", "--checkpoint", "nowhere", *BUDGET, "--out", "o"], nothing,
     2, ["checkpoint", "/nowhere not found"]),
    ("checkpoint-corrupt-weights", ["prune", "--checkpoint", "ckpt", *BUDGET, "--out", "o"],
     corrupt_weights, 2, ["cannot load weights", "model.safetensors"]),
    ("checkpoint-corrupt-architecture", ["prune", "--checkpoint", "ckpt", *BUDGET, "--out", "o"],
     corrupt_architecture, 2, ["cannot read", "architecture.json"]),
    ("checkpoint-unsupported-layer", ["prune", "--checkpoint", "ckpt", *BUDGET, "--out", "o"],
     unknown_layer_type, 2, ["architecture.json", "'features.0'", "unknown module type 'Warp2d'"]),
    ("pickle-without-flag", ["prune", "--checkpoint", "whole.pt", *BUDGET, "--out", "o"],
     nothing, 2, ["whole.pt", "pickle", "--allow-pickle"]),
    ("state-dict-without-model", ["prune", "--checkpoint", "state.pt", "--allow-pickle",
     *BUDGET, "--out", "o"], nothing, 2, ["state.pt", "holds a state_dict", "--model NAME"]),
    ("state-dict-wrong-model", ["prune", "--checkpoint", "state.pt", "--allow-pickle", "--model",
     "tiny-mlp", *BUDGET, "--out", "o"], nothing, 2, ["state.pt", "does not fit the --model"]),
    ("whole-model-with-model", ["prune", "--checkpoint", "whole.pt", "--allow-pickle", "--model",
     "digits-vgg", *BUDGET, "--out", "o"], nothing, 2,
     ["whole.pt", "not only tensors", "drop --model"]),
    ("no-prunable-layer", ["prune", "--checkpoint", "no_prunable", *BUDGET, "--out", "o"],
     nothing, 2, ["no layer eigendamage can prune", "'classifier'"]),
    ("no-prunable-channel", ["prune", "--checkpoint", "no_prunable", "--method", "l1", "--ratio",
     "0.3", "--device", "cpu", "--out", "o"], nothing, 2, ["no channel group l1 can prune"]),
    ("model-input-mismatch", ["prune", "--checkpoint", "wrong_input", *BUDGET, "--out", "o"],
     nothing, 2, ["wrong_input", "cannot take 'digits' inputs of shape (1, 8, 8)"]),
    ("model-class-mismatch", ["prune", "--checkpoint", "c100", *BUDGET, "--out", "o"], nothing,
     2, ["c100", "outputs shape (100,)", "10 classes"]),
    ("model-outputs-nan", ["prune", "--checkpoint", "nan", *BUDGET, "--out", "o"], nothing, 2,
     ["nan", "outputs NaN/Inf"]),
    ("checkpoint-inside-out", ["prune", "--checkpoint", "ckpt", *BUDGET, "--out", ".",
     "--force"], nothing, 2, ["lies inside the output directory"]),
    ("non-finite-loss", ["train", "--model", "tiny-mlp", "--epochs", "2", "--lr", "1e30",
     "--device", "cpu", "--no-progress", "--out", "o"], nothing, 2,
     ["training loss became", "lower the learning rate"]),
    ("demo-out-exists", ["demo", "--out", "out"], existing_out, 2, ["out exists", "--force"]),
    ("demo-bad-seed", ["demo", "--seed", "-1", "--out", "d"], nothing, 2,
     ["Invalid value for '--seed'"]),
]  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: any write shows up."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("args", "setup", "code", "fragments"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(
    args: list[str],
    setup: Callable[[Path], None],
    code: int,
    fragments: list[str],
    models: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for item in models.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp_path / item.name)
    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main(args) == code
    line = _one_error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line
    assert _tree(tmp_path) == before, "a failed run wrote or changed files"


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("exc", "code", "fragments"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3, ["--fisher-batches"]),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), 3, ["--batch-size"]),
        (MemoryError(), 3, ["out of memory", "--device cpu"]),
        (PermissionError(13, "Permission denied", "/x/metrics.json"), 2, ["/x/metrics.json"]),
        (OSError(28, "No space left on device"), 3, ["No space left on device", "free some space"]),
    ],
)  # fmt: skip
def test_resource_failures_are_one_line(
    exc: BaseException,
    code: int,
    fragments: list[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(runner, "run_train", fail)
    assert main(["train", "--model", "digits-vgg", "--out", str(tmp_path / "o")]) == code
    line = _one_error_line(capsys.readouterr().err)
    assert all(f in line for f in fragments)


def test_interrupt_says_how_to_resume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_train", interrupted)
    assert main(["train", "--model", "digits-vgg", "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted; continue with --resume {tmp_path}/o"


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(runner, "run_train", bug)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--model", "digits-vgg", "--out", str(tmp_path / "o")])


def test_entry_points_print_one_line(tmp_path: Path) -> None:
    """The installed script and ``python -m eigendamage`` (real interpreters, in parallel)."""
    script = Path(sys.executable).with_name("eigendamage")
    runs = [
        [sys.executable, "-m", "eigendamage", "prune", "--ratio", "abc", "--out", "a"],
        [str(script), "train", "--model", "nope", "--out", "b"],
    ]
    if not script.exists():  # pragma: no cover - not installed as a script
        runs.pop()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(r, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for r in runs
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert results[0][0] == 2 and "Invalid value for '--ratio'" in _one_error_line(results[0][1])
    if len(results) > 1:
        assert results[1][0] == 2 and "unknown model 'nope'" in _one_error_line(results[1][1])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- damping escalation


def test_singular_factors_escalate_damping_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """c-obs inverts both factors; digits' always-black border pixels make A singular."""
    torch.manual_seed(0)
    save_model(create_model("tiny-mlp", hidden=(16,)), tmp_path / "mlp")
    args = ["prune", "--checkpoint", str(tmp_path / "mlp"), "--method", "c-obs", "--ratio",
            "0.3", "--damping", "0", "--finetune-epochs", "0", "--fisher-batches", "2",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: layer 'features.1': factor A is singular" in err
    assert "retrying with damping 0.0001" in err
    assert (tmp_path / "o" / "metrics.json").is_file()


def test_damping_escalation_gives_up_naming_the_layer() -> None:
    tried: list[float] = []

    def always_singular(*, damping: float) -> None:
        tried.append(damping)
        raise SingularFactorError("layer 'conv3': factor S is singular")

    with pytest.raises(CurvatureError, match=r"layer 'conv3'.*still failing with damping 1,"):
        with_damping_escalation(always_singular, 1e-3)
    assert tried == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])

    def nan(*, damping: float) -> None:
        tried.append(damping)
        raise CurvatureError("layer 'fc': the K-FAC factor A holds NaN/Inf")

    tried.clear()
    with pytest.raises(CurvatureError, match="NaN/Inf"):
        with_damping_escalation(nan, 0.0)
    assert tried == [0.0]  # NaN cannot be damped away: no retries


def test_stable_eigendecompose_damps_only_the_failing_layer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from eigendamage.curvature import stability

    real = stability.eigendecompose
    eye = torch.eye(3, dtype=torch.float64)
    factors = {
        "ok": KFactors(eye.clone(), eye.clone(), "linear", False),
        "bad": KFactors(torch.diag(eye.diagonal() * torch.tensor([0, 0, 3])), eye, "linear", False),
    }

    def flaky(fs: dict[str, KFactors], **kwargs: object) -> dict:
        # LAPACK "fails" on the undamped singular factor, as it may on an ill-conditioned one.
        if any(torch.linalg.matrix_rank(f.A) < f.A.shape[-1] for f in fs.values()):
            raise CurvatureError("eigendecomposition of 2 factor(s) of size 3 failed")
        return real(fs, **kwargs)

    monkeypatch.setattr(stability, "eigendecompose", flaky)
    with caplog.at_level(logging.WARNING, logger="eigendamage"):
        kfe = stable_eigendecompose(factors, damping=0.0)
    assert torch.allclose(kfe["ok"].A.lam, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(kfe["bad"].A.lam, torch.tensor([1e-4, 1e-4, 3.0001], dtype=torch.float64))
    assert "layer 'bad'" in caplog.text and "retrying with damping 0.0001" in caplog.text
    nan = {"x": KFactors(torch.full((2, 2), float("nan")), eye[:2, :2], "linear", False)}
    with pytest.raises(CurvatureError, match="layer 'x'.*NaN/Inf"):
        stable_eigendecompose(nan)


def test_pickled_model_from_outside_the_registry_is_refused(tmp_path: Path) -> None:
    """A whole pickled model must come from the registry (else it cannot be saved safely)."""
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "foreign.pt")
    with pytest.raises(ModelError, match="Sequential not made by eigendamage's model registry"):
        load_model_file(tmp_path / "foreign.pt", allow_pickle=True)


def test_unsupported_layers_are_named() -> None:
    """A model whose only weight layers EigenDamage cannot prune names them and their type."""
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(24, 10))
    with pytest.raises(ModelError, match=r"output layer '2'; unsupported: '0' \(Conv1d\)"):
        runner._check_prunable(model, "eigendamage", (1, 1, 8))
