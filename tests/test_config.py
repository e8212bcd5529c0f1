"""Config models: ranges, exactly-one rules, one-line errors from files and overrides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eigendamage.config import (
    CompareConfig,
    FineTuneConfig,
    PruneConfig,
    TrainConfig,
    build_config,
    config_to_dict,
    load_config,
    merge_overrides,
)
from eigendamage.errors import ConfigError


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _json(tmp_path: Path, data: object, name: str = "x.json") -> Path:
    return _write(tmp_path, name, json.dumps(data))


def _error(path: Path, cls: type) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, cls)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_load_json_and_toml(tmp_path: Path) -> None:
    p = _json(tmp_path, {"model": "vgg19", "method": "eigendamage", "ratio": 0.5})
    cfg = load_config(p, PruneConfig)
    assert cfg.ratio == 0.5 and cfg.rounds == 1 and cfg.finetune == FineTuneConfig()
    toml = _write(
        tmp_path,
        "p.toml",
        'model = "vgg19"\nmethod = "c-obd"\ntarget_flops = 0.3\nfisher = "empirical"\n'
        "[finetune]\nepochs = 2\nlr = 1e-3\nbn_recalibration_batches = 5\n",
    )
    cfg = load_config(toml, PruneConfig)
    assert cfg.target_flops == 0.3 and cfg.fisher == "empirical"
    assert cfg.finetune.epochs == 2 and cfg.finetune.lr == 1e-3
    train = load_config(_json(tmp_path, {"model": "m", "lr": 1, "l1_bn": 1e-4}), TrainConfig)
    assert train.lr == 1.0 and train.schedule == "step" and train.l1_bn == 1e-4


def test_nested_range_error_is_one_line(tmp_path: Path) -> None:
    p = _json(tmp_path, {"model": "m", "method": "x", "ratio": 0.5, "finetune": {"lr": -1}})
    assert _error(p, PruneConfig) == (
        f"config {p}: finetune.lr: Input should be greater than 0 (got -1)"
    )


def test_unknown_keys_get_hints(tmp_path: Path) -> None:
    p = _json(tmp_path, {"model": "m", "lrr": 0.1})
    assert _error(p, TrainConfig) == f"config {p}: unknown key 'lrr' (did you mean 'lr'?)"
    p = _json(tmp_path, {"model": "m", "method": "x", "ratio": 0.2, "finetune": {"epoch": 1}})
    msg = _error(p, PruneConfig)
    assert "finetune: unknown key 'epoch' (did you mean 'epochs'?)" in msg
    p = _json(tmp_path, {"model": "m", "zzz": 1})
    assert _error(p, TrainConfig).endswith("unknown key 'zzz'")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"method": "x", "ratio": 0.5}, "give 'model' (a registry name) or 'checkpoint'"),
        ({"model": "m", "method": "x"}, "exactly one of ratio, target_params, target_flops"),
        ({"model": "m", "method": "x", "ratio": 0.5, "target_params": 0.5}, "got ratio, target_p"),
        ({"model": "m", "method": "x", "ratio": 1.0}, "ratio: Input should be less than 1"),
        ({"model": "m", "method": "x", "target_flops": 0}, "target_flops: Input should be greater"),
        ({"model": "m", "method": "x", "ratio": 0.5, "rounds": 0}, "rounds:"),
        ({"model": "m", "method": "x", "ratio": 0.5, "per_layer_cap": 1.5}, "per_layer_cap:"),
        ({"model": "m", "method": "x", "ratio": 0.5, "fisher": "exact"}, "'true' or 'empirical'"),
        ({"model": "m", "method": "x", "ratio": 0.5, "fisher_batches": 0}, "fisher_batches:"),
        ({"model": "m", "method": "x", "ratio": 0.5, "damping": -1e-3}, "damping:"),
        ({"model": "m", "method": "x", "ratio": 0.5, "device": "gpu"}, "device: not a device"),
        ({"model": "m", "method": "x", "ratio": "0.5"}, "ratio: Input should be a valid number"),
        ({"model": "m", "ratio": 0.5}, "method: Field required"),
    ],
)
def test_prune_config_rules(tmp_path: Path, data: dict, fragment: str) -> None:
    assert fragment in _error(_json(tmp_path, data), PruneConfig)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"model": "m", "momentum": 1.0}, "momentum: Input should be less than 1"),
        ({"model": "m", "schedule": "linear"}, "schedule: Input should be 'step', 'cosine'"),
        ({"model": "m", "epochs": -1}, "epochs:"),
        ({"model": "m", "epochs": "3"}, "epochs: Input should be a valid integer"),
        ({"model": "m", "batch_size": 0}, "batch_size:"),
        ({"model": "m", "l1_bn": -1}, "l1_bn:"),
        ({"model": "m", "seed": True}, "seed:"),
    ],
)
def test_train_config_rules(tmp_path: Path, data: dict, fragment: str) -> None:
    assert fragment in _error(_json(tmp_path, data), TrainConfig)


def test_file_level_errors(tmp_path: Path) -> None:
    assert "file not found" in _error(tmp_path / "nope.json", TrainConfig)
    assert "use .json or .toml" in _error(_write(tmp_path, "c.yaml", "a: 1"), TrainConfig)
    assert "invalid JSON" in _error(_write(tmp_path, "c.json", "{"), TrainConfig)
    assert "invalid TOML" in _error(_write(tmp_path, "c.toml", "a = "), TrainConfig)
    assert "top level" in _error(_write(tmp_path, "l.json", "[1]"), TrainConfig)
    inf = _write(tmp_path, "inf.toml", 'model = "m"\nlr = inf\n')
    assert "lr:" in _error(inf, TrainConfig)


def test_merge_overrides(tmp_path: Path) -> None:
    cfg = PruneConfig(model="m", method="eigendamage", ratio=0.5)
    new = merge_overrides(
        cfg, {"ratio": 0.7, "rounds": None, "finetune.lr": 0.05, "data_root": tmp_path}
    )
    assert new.ratio == 0.7 and new.rounds == 1 and new.finetune.lr == 0.05
    assert new.data_root == str(tmp_path)
    assert cfg.ratio == 0.5  # the original is untouched
    with pytest.raises(ConfigError, match=r"^options: finetune\.lr: Input should be greater"):
        merge_overrides(cfg, {"finetune.lr": 0.0})
    with pytest.raises(ConfigError, match="exactly one of ratio"):
        merge_overrides(cfg, {"target_params": 0.5})
    with pytest.raises(ConfigError, match="unknown key 'ratoi'"):
        merge_overrides(cfg, {"ratoi": 0.5})
    with pytest.raises(ConfigError, match="not a group"):
        merge_overrides(cfg, {"ratio.x": 0.5})


def test_model_names_the_architecture_of_a_state_dict_checkpoint() -> None:
    cfg = PruneConfig(model="m", checkpoint="w.pt", method="x", ratio=0.5)
    assert cfg.model == "m" and cfg.checkpoint == "w.pt"
    # Unpickling is allowed only by --allow-pickle on the command line, never by a config:
    # older run directories' `"allow_pickle": false` is dropped, `true` is refused.
    assert "allow_pickle" not in PruneConfig(model="m", method="x", ratio=0.5).model_dump()
    old = {"model": "m", "method": "x", "ratio": 0.5, "allow_pickle": False}
    assert "allow_pickle" not in PruneConfig.model_validate(old).model_dump()
    with pytest.raises(ValueError, match="pass --allow-pickle on the command line"):
        PruneConfig(model="m", checkpoint="w.pt", method="x", ratio=0.5, allow_pickle=True)


def test_build_config_merges_before_validating(tmp_path: Path) -> None:
    # A partial file completed by options is valid: validation happens after the merge.
    p = _json(tmp_path, {"model": "m", "rounds": 3, "finetune": {"epochs": 2}})
    cfg = build_config(PruneConfig, p, {"method": "eigendamage", "ratio": 0.5, "seed": None})
    assert (cfg.rounds, cfg.finetune.epochs, cfg.method, cfg.seed) == (3, 2, "eigendamage", 0)
    cfg = build_config(
        PruneConfig, None, {"model": "m", "method": "x", "target_flops": 0.5, "finetune.lr": 0.5}
    )
    assert cfg.finetune.lr == 0.5
    with pytest.raises(ConfigError, match=r"^command line: ratio: Input should be less than 1"):
        build_config(PruneConfig, None, {"model": "m", "method": "x", "ratio": 1.5})
    with pytest.raises(ConfigError, match=rf"^config {p} with command-line options: method"):
        build_config(PruneConfig, p, {"ratio": 0.5})
    with pytest.raises(ConfigError, match=rf"^config {p}: method: Field required"):
        build_config(PruneConfig, p, {})
    with pytest.raises(ConfigError, match="file not found"):
        build_config(PruneConfig, tmp_path / "nope.toml", {})


def test_compare_config_runs_and_rules() -> None:
    cfg = CompareConfig(checkpoint="run/model", methods=["eigendamage", "c-obd"], ratios=[0.3, 0.6])
    runs = cfg.runs()
    assert [(r.method, r.ratio) for r in runs] == [
        ("eigendamage", 0.3),
        ("eigendamage", 0.6),
        ("c-obd", 0.3),
        ("c-obd", 0.6),
    ]
    assert all(r.checkpoint == "run/model" and r.target_params is None for r in runs)
    flops = CompareConfig(model="m", methods=["l1"], target_flops=[0.5, 1.0]).runs()
    assert [r.target_flops for r in flops] == [0.5, 1.0]
    for bad in (
        {"methods": ["a", "a"], "ratios": [0.5]},
        {"methods": [], "ratios": [0.5]},
        {"methods": ["a"], "ratios": [0.5, 1.0]},
        {"methods": ["a"], "ratios": [0.5], "target_flops": [0.5]},
        {"methods": ["a"]},
    ):
        with pytest.raises(ValueError):
            CompareConfig(model="m", **bad)


def test_config_to_dict_roundtrip() -> None:
    cfg = PruneConfig(model="m", method="x", target_params=0.4, finetune=FineTuneConfig(epochs=1))
    data = config_to_dict(cfg)
    json.dumps(data)
    assert PruneConfig.model_validate(data) == cfg


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_ratio_accepted_iff_in_open_unit_interval(r: float) -> None:
    ok = math.isfinite(r) and 0 < r < 1
    try:
        PruneConfig(model="m", method="x", ratio=r)
    except ValueError:
        assert not ok
    else:
        assert ok
