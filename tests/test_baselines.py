"""Issue 13, item 3, fair and documented baselines: per-layer score normalisation for every
channel criterion, ``kron-obs-orig`` (the original code's Kron-OBS), ``l1`` ranking within
each layer (Li et al.), budgets too coarse for 1 % taking the nearest
model under the target, and weight-level obd/obs reporting the weights they zeroed."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from eigendamage import cli
from eigendamage.compare import RunRecord, _check_methods, result_rows, run_name
from eigendamage.config import CompareConfig, PruneConfig
from eigendamage.criteria import CRITERIA, ScoreContext, get_criterion
from eigendamage.criteria.ranking import layer_fractions, normalized
from eigendamage.curvature import KFactors
from eigendamage.errors import ConfigError
from eigendamage.methods import available_methods, run_pruning
from eigendamage.methods.budget import solve_ratio
from eigendamage.methods.channel import channel_prune
from eigendamage.reported import method_label, sparse_params

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
WIDTHS = (8, 12, 20, 16)


class Chain(nn.Module):
    """Conv-BN-ReLU layers of different widths, each its own channel group, and ``fc``."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _chain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Chain()
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # distinct gammas for slimming
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
    return model.eval()


def _psd(gen: torch.Generator, n: int) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    return x @ x.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def _factors(model: nn.Module, seed: int = 0) -> dict[str, KFactors]:
    """Random PSD factors in the real layout (bias coordinate, diagonal Fisher)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            d = m.weight[0].numel() + (m.bias is not None)
            out[name] = KFactors(
                A=_psd(gen, d),
                S=_psd(gen, len(m.weight)),
                kind="linear" if isinstance(m, nn.Linear) else "conv_patch",
                has_bias=m.bias is not None,
                extra={"diag": torch.rand(len(m.weight), d, generator=gen, dtype=torch.float64)},
            )
    return out


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _loader(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
        for _ in range(n)
    ]


def _removed_per_layer(info: dict) -> dict[str, int]:
    return {n: info["removed"].get(n, 0) for n in _conv_names(Chain())}


# -- normalize ------------------------------------------------------------------------------


def test_normalized_divides_each_layer_by_its_sum() -> None:
    scores = {
        "a": torch.tensor([1.0, 3.0]),
        "b": torch.tensor([10.0, 30.0, 60.0]),
        "z": torch.zeros(2),
    }
    out = normalized(scores)
    torch.testing.assert_close(out["a"], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out["b"], torch.tensor([0.1, 0.3, 0.6]))
    assert torch.equal(out["z"], torch.zeros(2))  # an all-zero layer stays as it is


@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_normalize_reaches_every_channel_criterion(method: str) -> None:
    model = _chain()
    kw = dict(method=method, ratio=0.3, example_inputs=X, factors=_factors(model), obs_update=False)
    _, plain = channel_prune(model, None, **kw)
    _, norm = channel_prune(model, None, normalize=True, **kw)
    for name, s in norm["scores"].items():
        assert float(s.sum()) == pytest.approx(1.0)
        torch.testing.assert_close(s, plain["scores"][name] / plain["scores"][name].sum())


def test_normalize_changes_a_global_ranking_across_layers_of_different_scale() -> None:
    """One layer's filters scaled by 100 (its c-obd scores by 10^4): without normalisation
    the global threshold never reaches that layer; normalised, every layer contributes."""
    model = _chain()
    factors = _factors(model)
    big = _conv_names(model)[2]
    with torch.no_grad():
        model.get_submodule(big).weight.mul_(100)
    kw = dict(method="c-obd", ratio=0.3, example_inputs=X, factors=factors)
    _, plain = channel_prune(model, None, **kw)
    _, norm = channel_prune(model, None, normalize=True, **kw)
    assert big not in plain["removed"]
    assert norm["removed"].get(big, 0) > 0


def test_run_pruning_threads_normalize_and_refuses_it_elsewhere() -> None:
    model = _chain()
    common = dict(ratio=0.3, input_shape=(1, 3, 8, 8))
    plain = run_pruning(model, _loader(), method="c-obd", **common)
    norm = run_pruning(model, _loader(), method="c-obd", normalize=True, **common)
    _, direct = channel_prune(
        model, _loader(), method="c-obd", ratio=0.3, example_inputs=X, normalize=True
    )
    assert norm.rounds[0].detail["removed"] == direct["removed"]
    assert norm.rounds[0].detail["removed"] != plain.rounds[0].detail["removed"]
    for method in ("eigendamage", "obd"):
        with pytest.raises(ConfigError, match="normalize applies to the channel criteria"):
            run_pruning(model, _loader(), method=method, normalize=True, **common)


def test_normalize_in_the_configs_and_the_compare_labels() -> None:
    assert PruneConfig(model="m", method="c-obd", ratio=0.5).normalize is False
    assert PruneConfig(model="m", method="c-obd", ratio=0.5, normalize=True).normalize
    with pytest.raises(ValidationError, match="normalize applies"):
        PruneConfig(model="m", method="eigendamage", ratio=0.5, normalize=True)
    cfg = CompareConfig(model="m", methods=["eigendamage", "c-obd", "c-obd+norm"], ratios=[0.5])
    runs = cfg.runs()
    assert [(r.method, r.normalize) for r in runs] == [
        ("eigendamage", False),
        ("c-obd", False),
        ("c-obd", True),
    ]
    assert [run_name(r) for r in runs] == [
        "eigendamage_ratio0.5",
        "c-obd_ratio0.5",
        "c-obd+norm_ratio0.5",
    ]
    _check_methods(cfg)
    everything = CompareConfig(
        model="m", methods=["eigendamage", "l1"], ratios=[0.5], normalize=True
    )
    assert [method_label(r) for r in everything.runs()] == ["eigendamage", "l1+norm"]
    with pytest.raises(ConfigError, match="normalize applies"):
        _check_methods(CompareConfig(model="m", methods=["eigendamage+norm"], ratios=[0.5]))
    with pytest.raises(ConfigError, match="listed twice"):
        _check_methods(
            CompareConfig(model="m", methods=["l1", "l1+norm"], ratios=[0.5], normalize=True)
        )
    with pytest.raises(ConfigError, match="Did you mean"):
        _check_methods(CompareConfig(model="m", methods=["c-obx+norm"], ratios=[0.5]))


def test_cli_prune_normalize_is_stored_and_used(tmp_path, monkeypatch) -> None:
    seen = {}
    real = run_pruning

    def spy(*args, **kwargs):
        seen["normalize"] = kwargs["normalize"]
        return real(*args, **kwargs)

    monkeypatch.setattr("eigendamage.runner.run_pruning", spy)
    out = tmp_path / "run"
    args = ["prune", "--model", "digits-vgg", "--method", "l1", "--ratio", "0.3"]
    args += ["--normalize", "--finetune-epochs", "0", "--device", "cpu", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["normalize"] is True
    assert seen == {"normalize": True}
    bad = ["prune", "--model", "digits-vgg", "--method", "eigendamage", "--ratio", "0.3"]
    assert cli.main([*bad, "--normalize", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


# -- kron-obs-orig ----------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_kron_obs_orig_is_the_original_formula(damping: float) -> None:
    """The original ``kfac_OBS_F2.py``: ``sum((W**2) @ A, 1) / diag(G^-1)`` (here with the
    1/2 every score carries) and ``delta = -(G^-1 with kept columns zeroed) @
    diag(1/diag(G^-1)) @ W``, computed here from scratch."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5))
    gen = torch.Generator().manual_seed(4)
    a, s = _psd(gen, 7), _psd(gen, 5)
    f = KFactors(A=a, S=s, kind="linear", has_bias=True)
    ctx = ScoreContext(layers=["0"], factors={"0": f}, damping=damping)
    w = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach().double()
    g = s + damping * s.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    g_inv = torch.linalg.inv(g)
    expected = torch.zeros(5, dtype=torch.float64)
    for i in range(5):
        expected[i] = 0.5 * sum(w[i, j] ** 2 * a[j, k] for j in range(7) for k in range(7))
        expected[i] /= g_inv[i, i]
    crit = get_criterion("kron-obs-orig")
    torch.testing.assert_close(crit.score(model, ctx)["0"], expected)
    pruned = torch.tensor([1, 4])
    cols = g_inv.clone()
    cols[:, [0, 2, 3]] = 0  # the original zeroes the kept units' columns
    delta = -cols @ torch.diag(1 / g_inv.diagonal()) @ w
    torch.testing.assert_close(crit.update(model, ctx, {"0": pruned})["0"], delta)
    # kron-obs keeps the quadratic form: it differs from the original's elementwise sum
    ours = get_criterion("kron-obs").score(model, ctx)["0"]
    assert not torch.allclose(ours, expected)


# -- l1 within each layer ---------------------------------------------------------------------


def _check_layerwise(model: nn.Module, info: dict, fraction: float) -> None:
    """Every conv lost ``fraction`` of its filters (within one) and exactly its lowest-norm."""
    for name in _conv_names(model):
        conv = model.get_submodule(name)
        n = conv.out_channels
        removed = info["removed"].get(name, 0)
        assert abs(removed - fraction * n) <= 1, (name, removed, n)
        norms = conv.weight.detach().flatten(1).abs().sum(1)
        kept = info["keep"].get(name, torch.arange(n))  # in a chain, group id = layer name
        dropped = sorted(set(range(n)) - set(kept.tolist()))
        assert dropped == torch.argsort(norms)[:removed].sort().values.tolist()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_l1_removes_the_same_fraction_of_every_layer(ratio: float) -> None:
    model = _chain()
    with torch.no_grad():  # scales that would skew a global ranking
        model.features[0].weight.mul_(50)
        model.features[6].weight.mul_(0.01)
    _, info = channel_prune(model, None, method="l1", ratio=ratio, example_inputs=X)
    _check_layerwise(model, info, ratio)
    removed = _removed_per_layer(info)
    assert sum(removed.values()) == math.floor(ratio * sum(WIDTHS))
    _, unscaled = channel_prune(_chain(), None, method="l1", ratio=ratio, example_inputs=X)
    assert _removed_per_layer(unscaled) == removed  # a layer's scale changes nothing


def test_l1_with_a_budget_keeps_layers_at_one_fraction() -> None:
    model = _chain()
    _, info = channel_prune(model, None, method="l1", target_flops=0.5, example_inputs=X)
    removed = _removed_per_layer(info)
    fractions = [removed[n] / w for n, w in zip(removed, WIDTHS, strict=True)]
    assert max(fractions) - min(fractions) <= 1 / min(WIDTHS) + 1e-9 and min(fractions) > 0
    _check_layerwise(model, info, sum(removed.values()) / sum(WIDTHS))
    before, after = info["flops"]
    assert after <= before * 0.5 * 1.01


def test_layer_fractions_rank_within_each_set() -> None:
    out = layer_fractions({"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([2.0, 0.5])})
    torch.testing.assert_close(out["a"], torch.tensor([1.0, 1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(out["b"], torch.tensor([1.0, 0.5], dtype=torch.float64))


# -- budgets too coarse for 1 % ---------------------------------------------------------------


class Tiny(nn.Module):
    """So few channels that one channel moves the parameter count by several percent."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def test_c_obs_budget_that_used_to_raise_takes_the_nearest_model_under_it(caplog) -> None:
    """Before: "target_params=0.6 cannot be met within 1%".  Now the nearest model at or
    under the target, the fraction reached in the info, and one log line."""
    torch.manual_seed(0)
    model = Tiny().eval()
    kw = dict(method="c-obs", example_inputs=X, factors=_factors(model), target_params=0.6)
    with caplog.at_level(logging.WARNING, logger="eigendamage"):
        pruned, info = channel_prune(model, None, **kw)
    before, after = info["params"]
    assert after == sum(p.numel() for p in pruned.parameters())
    assert after <= 0.6 * before
    reached = info["target_reached"]
    assert reached == pytest.approx(after / before / 0.6) and reached < 0.99  # > 1 % off
    lines = [r.getMessage() for r in caplog.records if "cannot be met" in r.getMessage()]
    assert len(lines) == 1 and f"{reached:.3f} of the target" in lines[0]


def test_a_coarse_budget_through_run_pruning_reports_target_reached(caplog) -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    with caplog.at_level(logging.WARNING, logger="eigendamage"):
        result = run_pruning(model, _loader(), method="l1", target_params=0.6, input_shape=X.shape)
    detail = result.rounds[0].detail
    assert result.after.params <= 0.6 * result.before.params
    assert detail["target_reached"] == pytest.approx(
        result.after.params / (0.6 * result.before.params)
    )
    assert detail["target_reached"] < 0.99
    assert sum("cannot be met" in r.getMessage() for r in caplog.records) == 1


def test_unreachable_budget_still_raises() -> None:
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="unreachable"):
        channel_prune(Tiny().eval(), None, method="l1", example_inputs=X, target_params=0.01)


def test_solve_ratio_takes_the_nearest_count_under_a_coarse_target(caplog) -> None:
    """EigenDamage's bisection on the ratio: the count jumps from 500 to 300 at r = 0.5, so
    a goal of 400 cannot be met within 1 %; the ratio of the model under it is taken."""

    def build(r: float) -> nn.Module:
        return nn.Linear(100, 5 if r < 0.5 else 3, bias=False)

    with caplog.at_level(logging.WARNING, logger="eigendamage"):
        r = solve_ratio(build, ("params", 400.0), (1, 100))
    assert r >= 0.5 and build(r).weight.numel() == 300
    assert any("0.750 of the target" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eigendamage"):
        assert solve_ratio(build, ("params", 300.0), (1, 100)) >= 0.5
    assert not caplog.records  # met exactly: no fallback, no log line


# -- weight-level: non-zero parameters --------------------------------------------------------


@pytest.mark.parametrize("method", ["obd", "obs"])
def test_weight_level_rounds_report_their_non_zero_parameters(method: str) -> None:
    model = _chain()
    result = run_pruning(model, _loader(), method=method, ratio=0.5, input_shape=X.shape)
    detail = result.rounds[0].detail
    dense = sum(p.numel() for p in result.model.parameters())
    zeros = sum(int((m.weight == 0).sum()) for m in result.model.modules() if hasattr(m, "weight"))
    assert result.after.params == dense  # the model keeps its shapes
    assert detail["params_nonzero"] == dense - zeros
    prunable = sum(model.get_submodule(n).weight.numel() for n in _conv_names(model))
    assert dense - detail["params_nonzero"] == pytest.approx(0.5 * prunable, abs=2)
    twice = run_pruning(model, _loader(), method=method, ratio=0.5, rounds=2, input_shape=X.shape)
    last = twice.rounds[-1].detail["params_nonzero"]  # round 2 zeroes half of what stood
    assert dense - last == pytest.approx(0.75 * prunable, abs=3)


def _metrics(nonzero: int | None) -> dict:
    detail = {"params_nonzero": nonzero} if nonzero is not None else {}
    return {
        "before": {"test_acc": 0.9, "val_acc": 0.9, "params": 1000, "flops": 5000},
        "after": {"test_acc": 0.8, "val_acc": 0.8, "params": 1000, "flops": 5000},
        "params_removed": 0.0,
        "flops_removed": 0.0,
        "test_acc_change": -0.1,
        "rounds": [{"ratio": 0.4, "detail": detail}],
        "seconds": {"prune": 1.0},
    }


def test_compare_and_summary_count_the_zeroed_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("eigendamage.compare.latencies", lambda models: dict.fromkeys(models, 1.0))
    records = [
        RunRecord("obd_ratio0.4", tmp_path, PruneConfig(model="m", method="obd", ratio=0.4),
                  _metrics(600)),
        RunRecord("l1+norm_ratio0.4", tmp_path,
                  PruneConfig(model="m", method="l1", ratio=0.4, normalize=True), _metrics(None)),
    ]  # fmt: skip
    rows = result_rows(None, records)
    obd, l1 = rows[1], rows[2]
    assert (obd["method"], obd["params"], obd["params_removed_pct"]) == ("obd", 600, 40.0)
    assert obd["flops_removed_pct"] == 0.0 and "non-zero" in obd["note"]
    assert (l1["method"], l1["params"], l1["params_removed_pct"]) == ("l1+norm", 1000, 0.0)
    assert "note" not in l1
    shown = sparse_params(_metrics(600))
    assert shown["after"]["params"] == 600 and shown["after"]["params_dense"] == 1000
    assert sparse_params(_metrics(None)) == _metrics(None)


def test_methods_lists_the_new_names(capsys) -> None:
    names = set(available_methods())
    assert {"l1", "kron-obs-orig", "kron-obd-orig"} <= names and "l1-global" not in names
    assert get_criterion("l1").ranking == "layer" and get_criterion("c-obd").ranking == "global"
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("kron-obs-orig ") and "original" in line for line in lines)
    assert any(line.startswith("l1 ") and "same fraction" in line for line in lines)


def test_cli_prune_summary_of_obd_counts_non_zero_parameters(tmp_path, capsys) -> None:
    args = ["prune", "--model", "digits-vgg", "--method", "obd", "--ratio", "0.5"]
    args += ["--fisher-batches", "1", "--finetune-epochs", "0", "--device", "cpu"]
    assert cli.main([*args, "--no-progress", "--out", str(tmp_path / "run")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    nonzero = metrics["rounds"][-1]["detail"]["params_nonzero"]
    assert metrics["after"]["params"] == metrics["before"]["params"]  # the file stays dense
    assert nonzero < 0.6 * metrics["before"]["params"]
    assert "non-zero weights" in text and f"{nonzero:,}" in text
