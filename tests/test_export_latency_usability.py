"""Export and latency as a user meets them: file formats, deterministic folds, ONNX timing,
tables piped to a file (issue 15, item 9)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eigendamage.cli import app
from eigendamage.cli.tables import print_table
from eigendamage.errors import ConfigError, ModelError
from eigendamage.export import export_model, fold_for_export, max_abs_diff
from eigendamage.io import save_model
from eigendamage.measure import count
from eigendamage.methods import run_pruning
from eigendamage.models import create_model
from eigendamage.surgery import fold as fold_module
from eigendamage.surgery.eigenbasis import KFEBottleneck

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A pruned digits-vgg with bottlenecks in their smallest forms, and its model directory."""
    torch.manual_seed(0)
    model = create_model("digits-vgg", widths=(16, "M", 32, "M", 64))
    x = torch.randn(16, *SHAPE)
    result = run_pruning(model, [(x, torch.randint(0, 10, (16,)))], ratio=0.6)
    net = result.model.eval()
    assert any(isinstance(m, KFEBottleneck) for m in net.modules())
    directory = tmp_path_factory.mktemp("pruned") / "model"
    save_model(net, directory)
    return net, directory


@pytest.fixture
def dense_is_fastest(monkeypatch):
    """Every timing says the dense layer wins: the largest possible latency choice."""

    def times(modules, x, repeats):
        return {form: 0.0 if form == "dense" else 1.0 for form in modules}

    monkeypatch.setattr(fold_module, "_best_times", times)


def onnx_weights(path: Path) -> int:
    graph = onnx.load(str(path)).graph
    return sum(int(torch.tensor(t.dims).prod()) for t in graph.initializer if t.data_type == 1)


def export(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def test_unknown_extension_is_refused_with_the_formats(pruned, tmp_path: Path):
    net, directory = pruned
    for name in ("m.tflite", "m"):
        result = export(str(directory), str(tmp_path / name))
        assert result.exit_code == 2, result.output
        assert ".onnx" in result.output and ".pt2" in result.output
        assert not (tmp_path / name).exists()
    result = export(str(directory), str(tmp_path / "m.onnx"), "--format", "pt2")
    assert result.exit_code == 2 and "name it .pt2" in result.output
    with pytest.raises(ConfigError, match=r"\.onnx"):
        export_model(net, tmp_path / "m.tflite", torch.randn(2, *SHAPE))
    assert not list(tmp_path.iterdir())


def test_default_export_is_the_pruned_model_and_params_never_grow(pruned, tmp_path: Path):
    net, directory = pruned
    params = sum(p.numel() for p in net.parameters())
    result = export(str(directory), str(tmp_path / "m.onnx"))
    assert result.exit_code == 0, result.output
    # BN is folded into the convs by the exporter: the graph has at most the model's weights
    assert onnx_weights(tmp_path / "m.onnx") <= params
    folded = fold_for_export(net, "params")
    assert folded.params_after <= folded.params_before == params
    assert folded.changed == {} and set(folded.forms.values()) <= {"full", "fold_in", "fold_out"}
    again = export(str(directory), str(tmp_path / "p.onnx"), "--fold", "params")
    assert again.exit_code == 0, again.output
    assert f"params {params:,} -> {params:,}" in again.output
    assert onnx_weights(tmp_path / "p.onnx") == onnx_weights(tmp_path / "m.onnx")


def test_latency_fold_is_explicit_reported_and_replayable(pruned, dense_is_fastest, tmp_path):
    net, directory = pruned
    out = tmp_path / "fast.onnx"
    result = export(str(directory), str(out), "--fold", "latency")
    assert result.exit_code == 0, result.output
    before = sum(p.numel() for p in net.parameters())
    folded = fold_for_export(net, "latency", torch.randn(2, *SHAPE))
    assert set(folded.forms.values()) == {"dense"} and folded.params_after > before
    assert f"params {before:,} -> {folded.params_after:,}" in result.output
    assert "x the pruned model's parameters" in result.output
    for name in folded.forms:
        assert f"{name}: " in result.output  # per-layer choice
    recorded = tmp_path / "fast.onnx.forms.json"
    assert json.loads(recorded.read_text()) == folded.forms
    # replaying the recorded choice needs no timing and gives the same graph
    replay = fold_for_export(net, folded.forms)
    assert replay.forms == folded.forms and replay.params_after == folded.params_after
    again = export(str(directory), str(tmp_path / "again.onnx"), "--fold", str(recorded))
    assert again.exit_code == 0, again.output
    assert onnx_weights(tmp_path / "again.onnx") == onnx_weights(out)
    x = torch.randn(3, *SHAPE)
    assert max_abs_diff(net, tmp_path / "again.onnx", x) < 1e-4
    with pytest.raises(ConfigError, match="cannot be built"):
        fold_for_export(replay.model, {next(iter(folded.forms)): "full"})
    bad = export(str(directory), str(tmp_path / "x.onnx"), "--fold", "fast")
    assert bad.exit_code == 2 and "none, params, latency" in bad.output


def test_bench_latency_times_onnx_files_like_models(pruned, tmp_path: Path):
    net, directory = pruned
    path = export_model(net, tmp_path / "m.onnx", torch.randn(2, *SHAPE))
    args = ["bench", "latency", "--batch-size", "2", "--repeats", "2", "--rounds", "1",
            "--warmup", "1", "--no-fold", "--json", str(tmp_path / "l.json")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--model", str(directory), "--model", str(path)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "l.json").read_text())
    name = str(path)
    assert row["ms"][name] > 0 and row["speedup"][name] > 0
    # the same MACs as the PyTorch model it was exported from
    assert row["flops_reduction"][name] == pytest.approx(row["flops_reduction"][str(directory)])
    assert 0 < row["params_reduction"][name] < 1
    from eigendamage.latency import OnnxModel

    counts = OnnxModel(path).counts((1, *SHAPE))
    assert counts.flops == count(net, (1, *SHAPE)).flops
    alone = CliRunner().invoke(app, ["bench", "latency", "--model", str(path)])
    assert alone.exit_code == 2 and "--baseline" in alone.output


def test_onnx_timing_without_onnxruntime_is_one_clear_error(pruned, tmp_path, monkeypatch):
    from eigendamage.latency import OnnxModel

    net, _ = pruned
    path = export_model(net, tmp_path / "m.onnx", torch.randn(2, *SHAPE))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=r"eigendamage\[export\]"):
        OnnxModel(path)


def test_table_piped_to_a_file_keeps_its_full_width(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    rows = [{f"a_rather_long_column_{i}": f"value_number_{i}_{i}" for i in range(8)}]
    print_table(rows, title="compare")
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) > 80
    for key, value in rows[0].items():
        assert key in text and value in text
    assert "…" not in text


def test_fold_leaves_bottlenecks_of_default_factors_alone() -> None:
    """``to_eigenbasis`` on default (patch-mode, bias) factors makes bottlenecks with a single
    form: folding for export keeps them and still folds nothing else."""
    import eigendamage as ed
    from eigendamage.export import fold_for_export

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    )  # fmt: skip
    loader = [(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))) for _ in range(2)]
    rotated = ed.to_eigenbasis(model, ed.eigendecompose(ed.collect_kfac(model, loader)))
    for how in ("params", "none"):
        folded = fold_for_export(rotated, how)
        assert folded.forms == {} and folded.changed == {}
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(folded.model(x), model(x), rtol=1e-4, atol=1e-5)
