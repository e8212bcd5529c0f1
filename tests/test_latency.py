"""Fastest exact forms (fold_for_speed) and the pruned-vs-original latency comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eigendamage.cli import app
from eigendamage.errors import ConfigError
from eigendamage.io import save_model
from eigendamage.latency import compare_latency, run_latency_bench
from eigendamage.methods import run_pruning
from eigendamage.models import create_model
from eigendamage.surgery import fold as fold_module
from eigendamage.surgery.eigenbasis import KFEBottleneck
from eigendamage.surgery.fold import fold_for_speed


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = create_model("digits-vgg", widths=(16, "M", 32, "M", 64))
    x = torch.randn(16, 1, 8, 8)
    result = run_pruning(model, [(x, torch.randint(0, 10, (16,)))], ratio=0.6)
    assert any(isinstance(m, KFEBottleneck) for m in result.model.modules())
    return model.eval(), result.model.eval()


@pytest.mark.parametrize("winner", ["full", "fold_out", "fold_in", "dense"])
def test_every_fold_choice_is_the_same_function(pair, winner, monkeypatch):
    """Force each form to time fastest: whatever is chosen computes the same outputs."""
    _, pruned = pair

    def fake_times(modules, x, repeats):
        return {form: 0.0 if form == winner else 1.0 for form in modules}

    monkeypatch.setattr(fold_module, "_best_times", fake_times)
    x = torch.randn(4, 1, 8, 8)
    folded, forms = fold_for_speed(pruned, x)
    bottlenecks = [n for n, m in pruned.named_modules() if isinstance(m, KFEBottleneck)]
    assert sorted(forms) == sorted(bottlenecks)
    possible = {"full", "fold_out", "fold_in", "dense"}
    assert set(forms.values()) <= possible and winner in forms.values()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pruned(x), atol=1e-5, rtol=1e-4)
    assert not any(p.is_inference() for p in folded.parameters())  # still trainable
    assert any(isinstance(m, KFEBottleneck) for m in pruned.modules())  # input untouched


def test_latency_comparison_and_command(pair, tmp_path: Path):
    original, pruned = pair
    timing = dict(warmup=1, repeats=2, rounds=2)
    rows = run_latency_bench(
        {"original": original, "pruned": pruned}, baseline="original", batch_sizes=[1, 4], **timing
    )
    assert [r.batch_size for r in rows] == [1, 4]
    for row in rows:
        assert set(row.ms) == {"original", "pruned", "pruned (folded)"}
        assert row.speedup["original"] == 1.0 and row.flops_reduction["original"] == 0.0
        assert row.flops_reduction["pruned"] > 0
        assert row.flops_reduction["pruned (folded)"] <= row.flops_reduction["pruned"] + 1e-9
        assert sum(row.forms["pruned (folded)"].values()) > 0
    with pytest.raises(ConfigError, match="baseline"):
        compare_latency({"a": pruned}, baseline="b")
    save_model(pruned, tmp_path / "pruned")
    result = CliRunner().invoke(
        app,
        ["bench", "latency", "--model", str(tmp_path / "pruned"), "--batch-size", "2",
         "--repeats", "2", "--rounds", "1", "--warmup", "1", "--json", str(tmp_path / "l.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "original (random init)" in result.output and "speed-up" in result.output
    assert (tmp_path / "l.json").is_file()


def test_token_models_are_timed_through_an_id_adapter():
    pytest.importorskip("transformers")
    model = create_model(
        "hf:bert-base-uncased",
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=40,
        max_position_embeddings=8,
    )
    (row,) = compare_latency({"bert": model}, baseline="bert", batch_sizes=[2], repeats=1, rounds=1)
    assert row.ms["bert"] > 0
