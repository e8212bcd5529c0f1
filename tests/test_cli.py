"""Happy paths of ``eigendamage train|prune|demo`` on tiny settings: every run directory holds
the resolved config, the environment, the metrics and a pickle-free model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from eigendamage import demo
from eigendamage.cli import app
from eigendamage.config import FineTuneConfig, PruneConfig, TrainConfig
from eigendamage.data import make_loaders
from eigendamage.io import load_model, save_model
from eigendamage.models import create_model
from eigendamage.train import evaluate

RUN_FILES = ("config.json", "environment.json", "metrics.json", "model/architecture.json",
             "model/model.safetensors")  # fmt: skip
PRUNE = ["--method", "eigendamage", "--ratio", "0.3", "--finetune-epochs", "0",
         "--fisher-batches", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
# tiny-mlp's 64-wide layers: at ratio 0.3 no bottleneck is smaller than the dense layer
PRUNE_MLP = [*PRUNE[:3], "0.6", *PRUNE[4:]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(create_model("digits-vgg", widths=(8, "M", 16)), path)
    return path


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _assert_run_dir(out: Path, cfg_cls: type) -> dict[str, Any]:
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    cfg = cfg_cls.model_validate(_read(out / "config.json"))  # the resolved config reloads
    assert _read(out / "config.json") == cfg.model_dump(mode="json")
    env = _read(out / "environment.json")
    for key in ("eigendamage", "torch", "python", "git_commit", "git_dirty", "argv"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert not list(out.rglob("*.tmp"))
    return _read(out / "metrics.json")


def test_train_writes_a_complete_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _invoke("train", "--model", "tiny-mlp", "--epochs", "2", "--lr", "0.05", "--device", "cpu",
            "--no-progress", "--seed", "4", "--out", str(out))  # fmt: skip
    metrics = _assert_run_dir(out, TrainConfig)
    cfg = _read(out / "config.json")
    assert (cfg["model"], cfg["epochs"], cfg["seed"], cfg["schedule"]) == ("tiny-mlp", 2, 4, "step")
    assert len(metrics["history"]["train_loss"]) == 2 and metrics["params"] > 0
    model = load_model(out / "model")  # safetensors + JSON: no unpickling
    loaders = make_loaders("digits", seed=4)
    assert evaluate(model, loaders.test).accuracy == pytest.approx(metrics["test_acc"])


def test_prune_writes_a_complete_run_with_round_checkpoints(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    output = _invoke("prune", "--checkpoint", str(checkpoint), *PRUNE, "--rounds", "2",
                     "--finetune-epochs", "1", "--out", str(out))  # fmt: skip
    assert "round 2/2" in output and "pruned" in output
    metrics = _assert_run_dir(out, PruneConfig)
    cfg = _read(out / "config.json")
    assert cfg["checkpoint"] == str(checkpoint) and cfg["finetune"]["epochs"] == 1
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["after"]["params"] < metrics["before"]["params"]
    assert (out / "rounds" / "round_2" / "model.safetensors").is_file()
    pruned = load_model(out / "model")
    assert evaluate(pruned, make_loaders("digits").val).accuracy == pytest.approx(
        metrics["after"]["val_acc"]
    )


def test_config_file_completed_by_options(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('method = "l1"\nrounds = 1\n[finetune]\nepochs = 0\n')
    out = tmp_path / "run"
    _invoke("prune", "--config", str(tmp_path / "c.toml"), "--checkpoint", str(checkpoint),
            "--ratio", "0.25", "--device", "cpu", "--no-progress", "--out", str(out))  # fmt: skip
    cfg = _read(out / "config.json")
    assert (cfg["method"], cfg["ratio"], cfg["finetune"]["epochs"]) == ("l1", 0.25, 0)


def _pruned_metrics(out: Path) -> dict[str, Any]:
    metrics = _read(out / "metrics.json")
    metrics.pop("seconds")
    for r in metrics["rounds"]:
        r.pop("seconds")
    return metrics


def test_legacy_checkpoints_load_only_when_allowed(tmp_path: Path) -> None:
    """A whole pickled model and a state_dict (pickle or safetensors) prune exactly like the
    pickle-free model directory they came from; ``--model`` names the state_dict's
    architecture (its registry defaults)."""
    torch.manual_seed(0)
    model = create_model("tiny-mlp")
    save_model(model, tmp_path / "dir")
    torch.save(model, tmp_path / "whole.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    _invoke(
        "prune", "--checkpoint", str(tmp_path / "dir"), *PRUNE_MLP, "--out", str(tmp_path / "ref")
    )
    ref = _read(tmp_path / "ref" / "metrics.json")
    assert ref["after"]["params"] < ref["before"]["params"]  # it really pruned
    refused = CliRunner().invoke(
        app, ["prune", "--checkpoint", str(tmp_path / "whole.pth"), *PRUNE_MLP, "--out", "x"]
    )
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    sources = {
        "whole": ["--checkpoint", str(tmp_path / "whole.pth"), "--allow-pickle"],
        "wrapped": ["--checkpoint", str(tmp_path / "wrapped.pt"), "--allow-pickle"],
        "safetensors": ["--checkpoint", str(tmp_path / "weights.safetensors")],
    }
    for name, source in sources.items():
        extra = [] if name == "whole" else ["--model", "tiny-mlp"]
        _invoke("prune", *source, *extra, *PRUNE_MLP, "--out", str(tmp_path / name))
        assert _pruned_metrics(tmp_path / name) == _pruned_metrics(tmp_path / "ref"), name
    # the flag is never stored: a resumed run needs --allow-pickle typed again
    assert "allow_pickle" not in _read(tmp_path / "whole" / "config.json")


def test_force_replaces_the_previous_run_only(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _invoke("prune", "--checkpoint", str(checkpoint), *PRUNE, "--rounds", "2", "--out", str(out))
    (out / "notes.txt").write_text("mine")
    _invoke("prune", "--checkpoint", str(checkpoint), *PRUNE, "--out", str(out), "--force")
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "rounds" / "round_2").exists()  # the old run's rounds are gone
    assert _read(out / "rounds" / "state.json")["finished_rounds"] == 1


def test_demo_writes_train_and_prune_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(demo.DEMO_TRAIN, "epochs", 1)
    monkeypatch.setitem(demo.DEMO_PRUNE, "rounds", 1)
    monkeypatch.setitem(demo.DEMO_PRUNE, "target_params", 0.5)
    monkeypatch.setitem(demo.DEMO_PRUNE, "finetune", FineTuneConfig(epochs=0))
    output = _invoke("demo", "--out", str(tmp_path / "demo"), "--no-progress", "--seed", "2")
    assert "EigenDamage on digits" in output
    _assert_run_dir(tmp_path / "demo" / "train", TrainConfig)
    metrics = _assert_run_dir(tmp_path / "demo" / "prune", PruneConfig)
    assert metrics["after"]["params"] == pytest.approx(0.5 * metrics["before"]["params"], rel=0.02)
    assert _read(tmp_path / "demo" / "prune" / "config.json")["seed"] == 2


@pytest.mark.parametrize("module", ["eigendamage", "eigendamage.cli"])
def test_every_command_is_reachable_through_python_dash_m(module):
    # torchrun launches modules: `-m eigendamage.cli` must see the commands that other
    # modules register (bench, compare, export), not only those defined in cli.py.
    out = subprocess.run(
        [sys.executable, "-m", module, "bench", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "prune-step" in out.stdout and "latency" in out.stdout
