"""Torch-Pruning's criteria as baselines (``tp-*``): matched budgets through run_pruning,
per-layer L1 against an independent computation, rounds, exclude, save/load, the CLI and
compare, and the gradients behind Taylor / Hessian."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from eigendamage import run_pruning
from eigendamage.cli import app
from eigendamage.config import CompareConfig, FineTuneConfig
from eigendamage.data import make_loaders
from eigendamage.errors import ConfigError
from eigendamage.io import load_model, save_model
from eigendamage.methods import available_methods
from eigendamage.methods.torch_pruning import TP_METHODS, tp_importance, tp_round
from eigendamage.methods.tp_gradients import gradients as _gradients
from eigendamage.models import create_model

LOADERS = make_loaders("digits", None, batch_size=64, seed=0)
MODELS = {
    "digits-vgg": lambda: create_model("digits-vgg", widths=(8, "M", 16)),
    "digits-resnet": lambda: create_model("digits-resnet"),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def _within_or_under(kept: float, target: float) -> bool:
    return abs(kept / target - 1) <= 0.01 or kept <= target


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", list(TP_METHODS))
def test_every_method_meets_a_flops_target_and_saves(
    method: str, name: str, tmp_path: Path
) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_pruning(model, LOADERS.train, method=method, target_flops=0.5, fisher_batches=2)
    pruned = result.model
    assert _within_or_under(result.flops_kept, 0.5), result.flops_kept
    assert result.after.params < result.before.params and result.after.flops < result.before.flops
    info = result.rounds[0]
    assert 0 < info.detail["removed_units"] <= info.detail["total_units"]
    assert info.detail["torch_pruning"] and info.detail["global_pruning"] is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert pruned.eigendamage_spec == model.eigendamage_spec
    assert all(p.grad is None for p in pruned.parameters())
    x, _ = next(iter(LOADERS.val))
    pruned.eval()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (len(x), 10) and torch.isfinite(out).all()
    loaded = load_model(save_model(pruned, tmp_path / "m")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_budget_is_within_one_percent_or_the_nearest_count_under_it() -> None:
    """Exhaustive over every number of channels TP's global ranking can remove."""
    model = _model("digits-vgg")
    ratio_info = run_pruning(model, LOADERS.train, method="tp-l1", ratio=0.5).rounds[0]
    units = ratio_info.detail["total_units"]
    assert ratio_info.detail["removed_units"] == units - int(units * 0.5)  # TP's count
    reachable = []
    for k in range(1, units):
        r = run_pruning(model, LOADERS.train, method="tp-l1", ratio=(k - 0.5) / units)
        if r.rounds[0].detail["removed_units"] != k:
            break  # beyond the per-layer cap the ratio is clipped
        reachable.append(r.flops_kept)
    cases = set()
    for target in (0.7, 0.55, 0.42, 0.3):
        got = run_pruning(model, LOADERS.train, method="tp-l1", target_flops=target).flops_kept
        if any(abs(v / target - 1) <= 0.01 for v in reachable):
            assert abs(got / target - 1) <= 0.01
            cases.add("within")
        else:  # one channel more or less jumps over the 1 % band
            assert got == max(v for v in reachable if v <= target)
            cases.add("under")
    assert cases == {"within", "under"}


def _group_l1(conv: nn.Conv2d, bn: nn.BatchNorm2d, consumer: nn.Module) -> torch.Tensor:
    """TP's group L1 written out: the mean over the coupled layers of each channel's L1 norm
    (the filter, the BN scale, the consumer's input slice)."""
    w = consumer.weight
    consumed = w.abs().sum(dim=tuple(d for d in range(w.dim()) if d != 1))
    return (conv.weight.abs().flatten(1).sum(1) + bn.weight.abs() + consumed) / 3


def test_per_layer_l1_removes_the_lowest_group_l1_filters() -> None:
    model = _model("digits-vgg")
    with torch.no_grad():
        for bn in (model.features[1], model.features[5]):
            bn.weight.copy_(torch.randn(bn.num_features))
    convs = [(model.features[0], model.features[1], model.features[4]),
             (model.features[4], model.features[5], model.classifier)]  # fmt: skip
    pruned, info = tp_round(
        model, LOADERS.train, method="tp-l1", ratio=0.5, target=None,
        input_shape=(1, 1, 8, 8), per_layer_cap=0.95, exclude={"classifier"}, seed=0,
        global_pruning=False,
    )  # fmt: skip
    expected_removed = {"features.0": 4, "features.4": 8}
    assert info.detail["removed"] == expected_removed and info.detail["global_pruning"] is False
    differs_from_filter_l1, keeps = False, {}
    for (conv, bn, consumer), name in zip(convs, expected_removed, strict=True):
        n_keep = conv.out_channels - expected_removed[name]
        keeps[name] = _group_l1(conv, bn, consumer).topk(n_keep).indices.sort().values
        plain = conv.weight.abs().flatten(1).sum(1).topk(n_keep).indices.sort().values
        differs_from_filter_l1 |= not torch.equal(plain, keeps[name])
    first, second = keeps["features.0"], keeps["features.4"]
    assert torch.equal(pruned.features[0].weight, model.features[0].weight[first])
    assert torch.equal(pruned.features[1].weight, model.features[1].weight[first])
    assert torch.equal(pruned.features[4].weight, model.features[4].weight[second][:, first])
    assert torch.equal(pruned.features[5].weight, model.features[5].weight[second])
    assert torch.equal(pruned.classifier.weight, model.classifier.weight[:, second])
    assert differs_from_filter_l1  # the check tells group L1 from the filter's own L1


def test_exclude_and_the_output_layer_are_never_pruned() -> None:
    model = _model("digits-resnet")
    result = run_pruning(model, LOADERS.train, method="tp-l2", ratio=0.4, exclude=["conv1"])
    pruned = result.model
    assert pruned.conv1.out_channels == model.conv1.out_channels
    assert pruned.fc.out_features == 10
    assert "conv1" not in result.rounds[0].detail["removed"]
    assert pruned.layer1[1].conv1.out_channels < model.layer1[1].conv1.out_channels


def test_rounds_each_call_the_pruner_to_their_target() -> None:
    model = _model("digits-resnet")
    result = run_pruning(
        model, LOADERS.train, method="tp-taylor", target_flops=0.4, rounds=2, fisher_batches=1
    )
    assert [i.round for i in result.rounds] == [1, 2]
    first, second = result.rounds
    assert _within_or_under(first.flops / result.before.flops, math.sqrt(0.4))
    assert _within_or_under(result.flops_kept, 0.4)
    assert second.detail["total_units"] < first.detail["total_units"]  # the smaller model
    assert second.detail["batches"] == 1


def test_a_cap_that_lets_nothing_go_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="removed nothing"):
        run_pruning(_model("digits-vgg"), LOADERS.train, method="tp-random", ratio=0.5,
                    per_layer_cap=0.01)  # fmt: skip


def test_methods_are_listed_and_unknown_names_get_a_hint() -> None:
    assert set(TP_METHODS) <= set(available_methods())
    output = CliRunner().invoke(app, ["methods"]).output.split()
    assert set(TP_METHODS) <= set(output)
    with pytest.raises(ConfigError, match="Did you mean 'tp-taylor'"):
        run_pruning(_model("digits-vgg"), LOADERS.train, method="tp-taylr", ratio=0.3)
    with pytest.raises(ConfigError, match="Did you mean 'tp-lamp'"):
        tp_importance("tp-lam")


def test_hessian_gradients_are_mean_squared_per_example_gradients() -> None:
    """Against torch.func per-example gradients (TP 1.6's own accumulate_grad keeps only the
    last example's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    params = dict(model.named_parameters())

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    got = _gradients(model, [(x[:3], y[:3]), (x[3:], y[3:])], squared=True, batches=2, device=None)
    for name in params:
        assert torch.allclose(got[name], per_example[name].pow(2).mean(0), atol=1e-6)
    taylor = _gradients(model, [(x, y)], squared=False, batches=1, device=None)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    for name, g in zip(params, expected, strict=True):
        assert torch.allclose(taylor[name], g, atol=1e-6)


def test_cli_prune_and_compare_run_a_tp_method(tmp_path: Path) -> None:
    from eigendamage.compare import run_compare

    torch.manual_seed(0)
    checkpoint = save_model(create_model("digits-vgg", widths=(8, "M", 16)), tmp_path / "ckpt")
    result = CliRunner().invoke(app, [
        "prune", "--checkpoint", str(checkpoint), "--method", "tp-taylor",
        "--target-flops", "0.6", "--fisher-batches", "2", "--finetune-epochs", "0",
        "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    pruned = load_model(tmp_path / "run" / "model")
    assert pruned.classifier.in_features < 16
    cfg = CompareConfig(
        checkpoint=str(checkpoint), model=None, dataset="digits",
        methods=["tp-lamp", "l1"], target_flops=[0.6], batch_size=64, device="cpu",
        finetune=FineTuneConfig(epochs=0, bn_recalibration_batches=2),
    )  # fmt: skip
    rows = run_compare(cfg, tmp_path / "cmp", log=lambda _: None, progress=False)
    ok = {r["method"]: r for r in rows if r.get("status") == "ok"}
    assert set(ok) == {"tp-lamp", "l1"}
    assert 100 - ok["tp-lamp"]["flops_removed_pct"] <= 60 * 1.01  # the same budget as l1


def test_random_scores_follow_the_seed() -> None:
    def kept(seed: int) -> torch.Tensor:
        r = run_pruning(_model("digits-resnet"), LOADERS.train, method="tp-random", ratio=0.3,
                        seed=seed)  # fmt: skip
        return r.model.conv1.weight

    assert torch.equal(kept(0), kept(0)) and not torch.equal(kept(0)[:4], kept(1)[:4])
