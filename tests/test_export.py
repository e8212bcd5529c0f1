"""ONNX and torch.export of pruned models: onnxruntime parity, dynamic batch, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eigendamage.cli import app
from eigendamage.errors import ConfigError
from eigendamage.export import export_model, max_abs_diff
from eigendamage.io import load_model, save_model
from eigendamage.methods import run_pruning
from eigendamage.models import create_model
from eigendamage.surgery.eigenbasis import KFEBottleneck

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def pruned(name: str, shape: tuple[int, ...], method: str = "eigendamage", **kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    x = torch.randn(8, *shape)
    loader = [(x, torch.randint(0, 10, (8,)))]
    return run_pruning(model, loader, method=method, ratio=0.5, input_shape=(1, *shape)).model


@pytest.mark.parametrize(
    ("name", "shape", "method"),
    [("torchvision:resnet18", (3, 32, 32), "eigendamage"), ("digits-resnet", (1, 8, 8), "l1")],
)
def test_onnx_matches_pytorch_on_pruned_models(name, shape, method, tmp_path: Path):
    model = pruned(name, shape, method).eval()
    assert any(isinstance(m, KFEBottleneck) for m in model.modules()) == (method != "l1")
    path = export_model(model, tmp_path / "m.onnx", torch.randn(2, *shape))
    for batch in (1, 5):  # the batch dimension is dynamic
        assert max_abs_diff(model, path, torch.randn(batch, *shape)) < 1e-4
    # save/load gives the same function, as the original class (a plain torchvision ResNet)
    save_model(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved").eval()
    assert type(loaded) is type(create_model(name))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pt2_export_and_errors(tmp_path: Path):
    model = pruned("digits-vgg", (1, 8, 8))
    model.train()
    path = export_model(model, tmp_path / "m.pt2", torch.randn(2, 1, 8, 8), fmt="pt2")
    assert model.training  # export traces in eval mode and restores the flag
    assert max_abs_diff(model.eval(), path, torch.randn(3, 1, 8, 8)) < 1e-5
    with pytest.raises(ConfigError, match="onnx"):
        export_model(model, tmp_path / "m.x", torch.randn(2, 1, 8, 8), fmt="tflite")


def test_export_command_checks_parity_with_onnxruntime(tmp_path: Path):
    model = pruned("digits-vgg", (1, 8, 8))
    save_model(model, tmp_path / "model")
    out = tmp_path / "model.onnx"
    args = ["export", "--format", "onnx", str(tmp_path / "model"), str(out)]
    result = CliRunner().invoke(app, [*args, "--tolerance", "1e-4"])
    assert result.exit_code == 0, result.output
    assert "max abs difference to PyTorch" in result.output
    assert max_abs_diff(model, out, torch.randn(7, 1, 8, 8)) < 1e-4
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
