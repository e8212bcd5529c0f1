"""The command line as a new user meets it (issue 15, items 4-8): required options and every
problem named at once, real defaults in help, ``--version``, ``--exclude`` kept in the run,
stage lines while a round runs, and ``models``/``methods`` that say what they accept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import eigendamage
from eigendamage.cli import app, main
from eigendamage.cli.options import option_of
from eigendamage.config import CompareConfig, PruneConfig, TrainConfig, load_config
from eigendamage.methods import available_methods, get_method, run_pruning

PRUNE = ["prune", "--model", "digits-vgg", "--device", "cpu", "--no-progress"]


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _params(command: str) -> dict[str, typer.core.click.Parameter]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- item 4


def test_missing_method_is_named_with_its_choices_and_the_other_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert main([*PRUNE, "--ratio", "2", "--fisher", "exact", "--out", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "Field required" not in line
    assert "--method is required (one of: " in line
    assert "kron-obd-orig" in line and "eigendamage" in line
    assert "ratio: Input should be less than 1" in line
    assert "fisher: Input should be 'true' or 'empirical'" in line
    assert not out.exists()


def test_rules_across_fields_are_reported_with_a_field_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no --method, no budget, no model: pydantic alone reports only the missing method
    assert main(["prune", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--method is required" in line
    assert "give exactly one of ratio, target_params, target_flops (got none)" in line
    assert "give 'model' (a registry name) or 'checkpoint'" in line


# --------------------------------------------------------------------------- item 5


def _default_text(cls: type, field: str) -> str | None:
    head, _, rest = field.partition(".")
    info = cls.model_fields[head]  # type: ignore[attr-defined]
    if rest:
        return _default_text(info.annotation, rest)
    value = info.get_default(call_default_factory=True)
    if value is None or value == [] or isinstance(value, bool):
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize(
    ("command", "cls"), [("train", TrainConfig), ("prune", PruneConfig), ("compare", CompareConfig)]
)
def test_help_shows_the_configs_defaults(command: str, cls: type) -> None:
    params = _params(command)
    fields = ["dataset", "batch_size", "seed", "device"]
    if cls is TrainConfig:
        fields += ["epochs", "lr", "weight_decay", "schedule"]
    else:
        fields += ["rounds", "per_layer_cap", "fisher", "finetune.epochs", "finetune.lr"]
    for field in fields:
        expected = _default_text(cls, field)
        assert expected is not None
        help_text = params[option_of(field)].help or ""
        assert f"(default: {expected})" in help_text, (command, field, help_text)


def test_help_marks_required_options_and_plain_flags() -> None:
    prune = _params("prune")
    assert "required" in (prune["method"].help or "")
    assert "required" in (_params("train")["model"].help or "")
    assert "configs/" not in (prune["config"].help or "")  # configs/ holds no PruneConfig
    for command in ("train", "prune", "compare", "demo"):
        params = _params(command)
        for flag in ("no_progress", "force", "allow_pickle"):
            if flag in params:
                assert params[flag].secondary_opts == [], (command, flag)  # no --no-force


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"eigendamage {eigendamage.__version__}"


# --------------------------------------------------------------------------- items 6, 7


def test_exclude_and_cap_are_options_kept_in_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "per_layer_cap" in _params("prune") and "per_layer_cap" in _params("compare")
    assert "exclude" in _params("compare")
    out = tmp_path / "run"
    args = [*PRUNE, "--method", "c-obd", "--ratio", "0.5", "--fisher-batches", "2"]
    args += ["--finetune-epochs", "0", "--per-layer-cap", "0.5"]
    args += ["--exclude", "features.0", "--exclude", "features.3,features.7", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    cfg = load_config(out / "config.json", PruneConfig)
    assert cfg.exclude == ["features.0", "features.3", "features.7"]
    assert cfg.per_layer_cap == 0.5
    model = eigendamage.load_model(out / "model")
    original = eigendamage.create_model("digits-vgg", num_classes=10, in_channels=1)
    for name in ("features.0", "features.3", "features.7"):
        assert model.get_submodule(name).out_channels == original.get_submodule(name).out_channels
    # stage lines of the round reach the command's output
    assert re.search(r"round 1/1: curvature \(2 batches\) \.\.\.", printed)
    assert re.search(r"round 1/1: curvature done in [0-9.]+ s", printed)
    assert "round 1/1: surgery done in" in printed
    # --resume continues with the stored exclude, and refuses a new one
    assert main(["prune", "--resume", str(out), "--exclude", "features.0"]) == 2
    assert "drop --exclude" in _error_line(capsys.readouterr().err)


def test_an_unknown_excluded_module_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    args = [*PRUNE, "--method", "l1", "--ratio", "0.3", "--exclude", "feature.0"]
    assert main([*args, "--out", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "no module 'feature.0'" in line and "'features.0'" in line
    assert not out.exists()
    assert main([*args[:-1], "a,,b", "--out", str(out)]) == 2
    assert "--exclude: empty name" in _error_line(capsys.readouterr().err)


def _tiny() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)
    )
    data = TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 4, (32,)))
    return model, DataLoader(data, batch_size=8)


@pytest.mark.parametrize(
    ("method", "stages"),
    [
        ("eigendamage", ["curvature (4 batches)", "eigendecomposition of 1 layers", "surgery"]),
        ("kron-obd", ["curvature (4 batches)", "scoring of 1 channel groups", "surgery"]),
        ("obd", ["curvature (4 batches)"]),
    ],
)
def test_rounds_say_each_stage_through_log_only(
    method: str, stages: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    model, loader = _tiny()
    lines: list[str] = []
    run_pruning(model, loader, method=method, ratio=0.5, rounds=2, log=lines.append)
    for r in (1, 2):
        for stage in stages:
            assert f"round {r}/2: {stage} ..." in lines, (stage, lines)
            name = stage.split(" ")[0]
            assert any(re.fullmatch(rf"round {r}/2: {name} done in [0-9.]+ s", x) for x in lines)
    with caplog.at_level("DEBUG", logger="eigendamage"):
        run_pruning(model, loader, method=method, ratio=0.5)  # the library is quiet by default
    assert not any("curvature" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- item 8


def test_models_lists_the_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "digits-vgg" in out
    for source, example in (("torchvision", "resnet18"), ("timm", "resnet18"), ("hf", "bert")):
        line = next(x for x in out.splitlines() if x.startswith(f"{source}:NAME"))
        assert f"e.g. {source}:{example}" in line
        assert "(installed)" in line or "eigendamage[models]" in line


def test_methods_lists_budgets_and_a_description_for_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["methods"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in available_methods():
        method = get_method(name)
        assert method.description, name
        assert " ".join(method.budgets) in rows[name] and method.description in rows[name]
    assert "Kron-OBD as the original code" in rows["kron-obd-orig"]
    assert "Kron-OBS as the original code" in rows["kron-obs-orig"]
    assert re.search(r"^obd\s+ratio\s+weights", rows["obd"])


def test_compare_runs_inherit_exclude() -> None:
    cfg = CompareConfig(
        model="m", methods=["l1"], ratios=[0.3, 0.5], exclude=["features.0"], per_layer_cap=0.5
    )
    assert all(r.exclude == ["features.0"] and r.per_layer_cap == 0.5 for r in cfg.runs())
    # an older run's config.json, without the field, still loads
    old = json.loads(PruneConfig(model="m", method="l1", ratio=0.3).model_dump_json())
    del old["exclude"]
    assert PruneConfig.model_validate(old).exclude == []
