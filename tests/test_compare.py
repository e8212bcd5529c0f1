"""`eigendamage compare`: outputs, one row per run, resume skipping finished runs, failed runs
recorded instead of aborting; the shipped configs load with the right schema."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import eigendamage.compare as compare
from eigendamage.cli import app
from eigendamage.config import CompareConfig, FineTuneConfig, TrainConfig, load_config
from eigendamage.errors import ConfigError
from eigendamage.methods import available_methods

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(
    dataset="digits",
    methods=["eigendamage", "obd"],
    target_flops=[
        0.5,
        0.3,
    ],  # obd is weight-level: its runs fail (no FLOPs budget) and are recorded
    fisher_batches=2,
    batch_size=64,
    device="cpu",
    finetune=FineTuneConfig(epochs=0, bn_recalibration_batches=2),
)
TRAIN = TrainConfig(model="digits-vgg", epochs=1, batch_size=64, device="cpu")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_compare_writes_results_records_failures_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    cfg = CompareConfig(model="digits-vgg", **TINY)
    rows = compare.run_compare(cfg, out, train=TRAIN, log=lambda _: None, progress=False)

    for name in ("results.csv", "results.md", "acc_vs_params.png", "acc_vs_flops.png"):
        assert (out / name).stat().st_size > 0
    table = read_csv(out / "results.csv")
    assert [r["method"] for r in table] == ["original"] + ["eigendamage"] * 2 + ["obd"] * 2
    assert len(table) == 1 + len(cfg.runs()) == len(rows)
    ok = [r for r in table if r["status"] == "ok"]
    failed = [r for r in table if r["status"] == "failed"]
    assert [r["budget"] for r in ok] == ["flops 0.5", "flops 0.3"]
    assert all("weight-level" in r["error"] for r in failed) and len(failed) == 2
    for r, kept in zip(ok, (0.5, 0.3), strict=True):
        assert float(r["flops_removed_pct"]) == pytest.approx(100 * (1 - kept), abs=1.5)
        assert float(r["latency_ms"]) > 0 and float(r["speedup"]) > 0
        assert (out / "runs" / r["run"] / "metrics.json").is_file()
    assert "weight-level" in (out / "results.md").read_text()

    calls: list[str] = []
    real_prune = compare.run_prune

    def counting_prune(cfg, run_dir, **kwargs):
        calls.append(Path(run_dir).name)
        return real_prune(cfg, run_dir, **kwargs)

    monkeypatch.setattr(compare, "run_prune", counting_prune)
    finished = {f"runs/{r['run']}": 0.0 for r in ok} | {"train": 0.0}
    finished = {d: (out / d / "metrics.json").stat().st_mtime for d in finished}
    again = compare.run_compare(
        cfg, out, train=TRAIN, resume=True, log=lambda _: None, progress=False
    )
    assert sorted(calls) == ["obd_flops0.3", "obd_flops0.5"]  # only the failed runs again
    for run_dir, mtime in finished.items():  # the training and finished runs are kept
        assert (out / run_dir / "metrics.json").stat().st_mtime == mtime
    assert [r["test_acc"] for r in again if r["status"] == "ok"] == [
        r["test_acc"] for r in rows if r["status"] == "ok"
    ]


def test_compare_refuses_unknown_methods_before_writing(tmp_path):
    cfg = CompareConfig(model="digits-vgg", **{**TINY, "methods": ["eigendamage", "c-obx"]})
    with pytest.raises(ConfigError, match="c-obd"):
        compare.run_compare(cfg, tmp_path / "cmp", train=TRAIN, progress=False)
    assert not (tmp_path / "cmp").exists()


def test_cli_compare_and_resume(tmp_path):
    out = tmp_path / "cli"
    args = [
        "compare",
        "--methods",
        "eigendamage",
        "--ratios",
        "0.3",
        "--train-epochs",
        "1",
        "--finetune-epochs",
        "0",
        "--fisher-batches",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(read_csv(out / "results.csv")) == 2
    assert json.loads((out / "config.json").read_text())["model"] == "digits-vgg"
    resumed = CliRunner().invoke(app, ["compare", "--resume", str(out), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "eigendamage_ratio0.3: finished before" in resumed.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "digits-vgg", "--ratios", "0.3"], "--train-epochs"),
        (["--ratios", "0.3,x", "--train-epochs", "1"], "--ratios"),
        (["--ratios", "0.3", "--target-flops", "0.5", "--train-epochs", "1"], "exactly one"),
    ],
)
def test_cli_compare_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["compare", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- shipped configs

SCHEMA = {"pretrain": TrainConfig}  # every other folder holds CompareConfigs


def config_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.json"))


def test_configs_exist_for_every_paper_setting():
    names = {str(p.relative_to(CONFIGS)) for p in config_files()}
    for stem in ("cifar10_vgg19", "cifar10_resnet32", "cifar100_vgg19", "cifar100_resnet32"):
        assert {f"pretrain/{stem}.json", f"one_pass/{stem}.json", f"iterative/{stem}.json"} <= names
    assert {"pretrain/tiny_imagenet_vgg19.json", "one_pass/tiny_imagenet_vgg19.json"} <= names


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_with_its_schema(path: Path):
    folder = path.parent.name
    cfg = load_config(path, SCHEMA.get(folder, CompareConfig))
    if isinstance(cfg, TrainConfig):
        assert cfg.schedule == "step" and cfg.lr == 0.1 and cfg.weight_decay == 2e-4
        return
    assert set(cfg.methods) <= set(available_methods())
    # each comparison prunes the checkpoint its pretrain config produces
    assert cfg.checkpoint == f"checkpoints/{path.stem}/model"
    assert (CONFIGS / "pretrain" / f"{path.stem}.json").is_file()
    assert cfg.finetune.epochs == 150 and cfg.finetune.schedule == "step"
    if folder == "iterative":
        assert (cfg.rounds, cfg.ratios, cfg.per_layer_cap) == (7, [0.5], 0.5)
    else:
        assert cfg.rounds == 1 and cfg.per_layer_cap == 0.95
