"""Issue 12, items 6 and 11-14: the API stops on empty rounds, keeps the input's train/eval
modes, never unties tied weights, adds ``exclude=`` to the default exclusion (checking the
names) and turns bad arguments, unprunable models and out-of-range labels into the
library's own errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import eigendamage
from eigendamage import cli, runner
from eigendamage.errors import ConfigError, DataError, ModelError
from eigendamage.io import save_model
from eigendamage.measure import count
from eigendamage.methods import run_pruning
from eigendamage.models import create_model
from eigendamage.train import evaluate, train

SHAPE = (1, 3, 8, 8)


class Net(nn.Module):
    """Two conv-BN blocks and a classifier ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Nested(nn.Module):
    """A block two levels deep: excluding ``block`` must reach ``block.0.0``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.block = nn.Sequential(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.block(torch.relu(self.stem(x)))))


class Tied(nn.Module):
    """``a`` and ``b`` share one weight; ``inp`` (with ``mid``) is an untied, prunable part."""

    def __init__(self, width: int = 32, untied: bool = True) -> None:
        super().__init__()
        self.mid = nn.Linear(12, 24) if untied else None
        self.inp = nn.Linear(24 if untied else 12, width)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mid is not None:
            x = torch.relu(self.mid(x))
        x = torch.relu(self.inp(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def images(n: int = 32, classes: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE[1:], generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def vectors(
    n: int = 32, features: int = 12, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g), torch.randint(0, 4, (n,), generator=g))]


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


# ------------------------------------------------------------------ 6: empty rounds stop


@pytest.mark.parametrize("method", ["eigendamage", "l1"])
def test_a_round_that_removes_nothing_ends_the_loop(method: str) -> None:
    calls: list[int] = []

    def on_round(model: nn.Module, info) -> None:
        calls.append(info.round)
        assert len(calls) <= 12, "rounds keep coming after nothing is left to prune"

    lines: list[str] = []
    result = run_pruning(net(), images(), method=method, ratio=0.5, rounds=1_000_000,
                         input_shape=SHAPE, on_round=on_round, log=lines.append)  # fmt: skip
    done = len(result.rounds)
    assert 1 <= done <= 12 and calls == list(range(1, done + 1))
    assert f"round {done + 1} removed nothing: stopping after {done} rounds" in lines
    assert result.after.params < result.before.params


def test_a_first_round_that_removes_nothing_is_a_config_error() -> None:
    # 1% of the 27 eigen-directions (16 channels for l1) rounds down to none
    with pytest.raises(ConfigError, match="round 1 of eigendamage removed nothing"):
        run_pruning(net(), images(), ratio=0.01, input_shape=SHAPE)
    with pytest.raises(ConfigError, match="removed nothing"):
        run_pruning(net(), images(), method="l1", ratio=0.01, input_shape=SHAPE)


def test_weight_level_ratio_is_per_round_so_rounds_keep_pruning() -> None:
    result = run_pruning(net(), images(), method="obd", ratio=0.5, rounds=2, input_shape=SHAPE)
    assert [r.round for r in result.rounds] == [1, 2]
    assert result.rounds[0].ratio == pytest.approx(0.5, abs=0.01)
    assert result.rounds[1].ratio == pytest.approx(0.75, abs=0.01)  # half of what was left


def test_cli_prune_with_a_million_rounds_ends_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "model"
    save_model(create_model("digits-vgg", widths=(4, "M", 8)), ckpt)
    saves: list[Path] = []
    real_save = runner.save_model

    def counting_save(model: nn.Module, path: Path) -> None:
        saves.append(Path(path))
        assert len(saves) <= 20, "round directories keep being written"
        real_save(model, path)

    monkeypatch.setattr(runner, "save_model", counting_save)
    out = tmp_path / "run"
    code = cli.main(["prune", "--checkpoint", str(ckpt), "--data", "digits", "--method", "l1",
                     "--ratio", "0.5", "--rounds", "1000000", "--finetune-epochs", "0",
                     "--fisher-batches", "2", "--device", "cpu", "--no-progress",
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    rounds = sorted(p.name for p in (out / "rounds").glob("round_*"))
    assert 1 <= len(rounds) < 10
    assert (out / "metrics.json").is_file()


# ------------------------------------------------------------------ 11: train/eval modes


@pytest.mark.parametrize("method", ["eigendamage", "l1"])
@pytest.mark.parametrize("training", [False, True])
def test_the_result_is_in_the_input_models_mode(method: str, training: bool) -> None:
    model = net().train(training)
    pruned = eigendamage.prune(model, images(), method=method, ratio=0.5, input_shape=SHAPE)
    assert pruned is not model
    flags = {name: m.training for name, m in pruned.named_modules()}
    assert set(flags.values()) == {training}, flags
    if method == "eigendamage":  # new modules were built: the check is not vacuous
        assert any("rot_in" in name or "core" in name for name in flags)


def test_modules_keep_their_own_mode_in_a_mixed_model() -> None:
    model = net().train()
    model.b1.eval()  # e.g. frozen BatchNorm statistics
    pruned = eigendamage.prune(model, images(), ratio=0.5, input_shape=SHAPE)
    assert not pruned.b1.training
    assert all(m.training for name, m in pruned.named_modules() if not name.startswith("b1"))


# ------------------------------------------------------------------ 12: tied weights


@pytest.mark.parametrize("method", ["l1", "c-obd"])
def test_channel_methods_keep_ties(method: str) -> None:
    torch.manual_seed(0)
    model = Tied()
    pruned = eigendamage.prune(model, vectors(), method=method, ratio=0.3)
    assert pruned.a.weight is pruned.b.weight  # the tie survives
    before = count(model, (1, 12)).params  # parameters() counts a shared tensor once
    after = count(pruned, (1, 12)).params
    assert after < before  # the untied part was pruned
    assert pruned.mid.out_features < 24
    assert pruned.a.weight.shape == model.a.weight.shape


@pytest.mark.parametrize("method", ["eigendamage", "obd"])
def test_eigendamage_and_weight_level_keep_ties(method: str) -> None:
    torch.manual_seed(0)
    model = Tied()
    lines: list[str] = []
    result = run_pruning(model, vectors(), method=method, ratio=0.5, log=lines.append)
    assert result.model.a.weight is result.model.b.weight
    assert any("'a.weight' = 'b.weight'" in line and "left unpruned" in line for line in lines)
    assert result.after.params <= result.before.params
    if method == "obd":  # the tied weight was not zeroed by one layer's mask
        assert "a" not in result.rounds[0].detail["per_layer_sparsity"]
        assert torch.count_nonzero(result.model.a.weight) == model.a.weight.numel()


def test_a_model_with_only_tied_layers_to_prune_is_refused_with_their_names() -> None:
    torch.manual_seed(0)
    with pytest.raises(ModelError, match=r"'a\.weight' = 'b\.weight'"):
        eigendamage.prune(Tied(untied=False), vectors(), method="l1", ratio=0.3)


# ------------------------------------------------------------------ 13: exclude=


@pytest.mark.parametrize("method", ["eigendamage", "obd"])
def test_exclude_adds_to_the_default_output_layer(method: str) -> None:
    model = net()
    pruned = eigendamage.prune(model, images(), method=method, ratio=0.5, exclude=["c1"],
                               input_shape=SHAPE)  # fmt: skip
    for name in ("c1", "fc"):  # both left exactly as they were
        layer = pruned.get_submodule(name)
        assert type(layer) is type(model.get_submodule(name))
        assert torch.equal(layer.weight, model.get_submodule(name).weight), name
    c2 = pruned.c2  # the rest is pruned: a bottleneck, or zeros
    assert not isinstance(c2, nn.Conv2d) or torch.count_nonzero(c2.weight) < c2.weight.numel()


def test_excluding_a_block_excludes_every_layer_inside_it() -> None:
    torch.manual_seed(0)
    model = Nested()
    pruned = eigendamage.prune(model, vectors(), ratio=0.5, exclude=["block"])
    for name in ("block.0.0", "block.1", "fc"):
        assert isinstance(pruned.get_submodule(name), nn.Linear), name
        assert torch.equal(pruned.get_submodule(name).weight, model.get_submodule(name).weight)
    assert not isinstance(pruned.stem, nn.Linear)  # the rest is pruned


@pytest.mark.parametrize("method", ["eigendamage", "l1", "obd"])
def test_a_misspelt_exclude_name_is_a_config_error_with_a_hint(method: str) -> None:
    with pytest.raises(ConfigError, match=r"no module 'fc1'.*Did you mean 'fc'"):
        eigendamage.prune(net(), images(), method=method, ratio=0.5, exclude=["fc1"],
                          input_shape=SHAPE)  # fmt: skip


# ------------------------------------------------------------------ 14: validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damping": -1.0}, "damping"),
        ({"damping": math.nan}, "damping"),
        ({"damping": math.inf}, "damping"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": math.nan}, "ratio"),
        ({"ratio": None, "target_params": 0.0}, "target_params"),
        ({"ratio": None, "target_flops": 1.5}, "target_flops"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": 2.5}, "rounds"),
        ({"per_layer_cap": 0.0}, "per_layer_cap"),
        ({"per_layer_cap": 1.5}, "per_layer_cap"),
        ({"fisher": "emprical"}, "fisher"),
        ({"fisher_batches": 0}, "fisher_batches"),
        ({"fisher_samples": 0}, "fisher_samples"),
    ],
)
def test_bad_arguments_are_config_errors_before_any_work(kwargs: dict, match: str) -> None:
    def no_data():
        raise AssertionError("the loader was read before the arguments were checked")
        yield

    args = {"method": "c-obs", "ratio": 0.5, "input_shape": SHAPE, **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_pruning(net(), no_data(), **args)


def test_a_model_without_parameters_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="no parameters"):
        eigendamage.prune(nn.Sequential(nn.Flatten()), images(), method="l1", ratio=0.5)


@pytest.mark.parametrize("method", ["l1", "c-obd", "obd"])
def test_a_model_with_only_its_output_layer_names_it(method: str) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    with pytest.raises(ModelError, match="'1'"):
        eigendamage.prune(model, images(), method=method, ratio=0.5)


def test_eigendamage_names_the_layers_it_left_dense() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Flatten(), nn.Linear(216, 4))
    with pytest.raises(ModelError, match=r"0: grouped conv \(groups=3\)"):
        eigendamage.prune(model, images(), ratio=0.5)


def test_out_of_range_labels_in_the_curvature_pass_are_a_data_error() -> None:
    bad = images(classes=10)  # the model has 4 classes
    with pytest.raises(DataError, match=r"label \d+ is outside \[0, 4\)"):
        eigendamage.prune(net(), bad, method="c-obd", ratio=0.5, fisher="empirical")


def test_out_of_range_labels_in_fine_tuning_and_evaluation_are_data_errors() -> None:
    model = net()
    bad = [(torch.randn(4, *SHAPE[1:]), torch.tensor([0, 1, 4, 2]))]
    with pytest.raises(DataError, match=r"label 4 is outside \[0, 4\)"):
        train(model, bad, epochs=1, lr=0.01, progress=False)
    negative = [(torch.randn(2, *SHAPE[1:]), torch.tensor([0, -3]))]
    with pytest.raises(DataError, match=r"label -3 is outside \[0, 4\)"):
        evaluate(model, negative)
