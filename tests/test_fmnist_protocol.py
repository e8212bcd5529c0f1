"""The paper's-protocol driver (benchmarks/fmnist_protocol.py) on the embedded digits data:
every cell is written once with the measurements the results page needs, and a second
start skips what is done (the CPU run spans several sittings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol():
    spec = importlib.util.spec_from_file_location(
        "fmnist_protocol", ROOT / "benchmarks" / "fmnist_protocol.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(out: Path) -> dict:
    return {
        "out": str(out),
        "dataset": "digits",
        "data_root": None,
        "batch_size": 64,
        "train_subset": 600,
        "test_subset": 200,
        "threads": 1,
        "models": {"digits-vgg": {"widths": [8, "M", 16]}},
        "seeds": [0],
        "modes": ["one-pass", "iterative"],
        "methods": ["eigendamage", "l1"],
        "methods_by_model": {},
        "flops_kept": [0.6],
        "fisher_batches": 2,
        "bn_batches": 2,
        "pretrain": {"epochs": 2, "lr": 0.05},
        "one_pass": {"rounds": 1, "per_layer_cap": 0.95, "finetune": {"epochs": 2, "lr": 0.01}},
        "iterative": {
            "rounds": 2,
            "per_layer_cap": 0.5,
            "methods": ["eigendamage"],
            "between_rounds": {"epochs": 1, "lr": 0.01},
            "finetune": {"epochs": 2, "lr": 0.01},
        },
    }


def test_every_cell_is_measured_once_and_resumed(protocol, tmp_path, capsys) -> None:
    cfg = _config(tmp_path / "run")
    keys = list(protocol.cells(cfg))
    assert [k[2:] for k in keys] == [
        ("one-pass", 0.6, "eigendamage"), ("one-pass", 0.6, "l1"), ("iterative", 0.6, "eigendamage")
    ]  # fmt: skip
    protocol.run(cfg)
    records = [json.loads(protocol.cell_path(cfg, *k).read_text()) for k in keys]
    for key, rec in zip(keys, records, strict=True):
        assert "error" not in rec, rec
        for stage in ("pruned", "finetune_1", "finetune_n"):
            assert 0.0 <= rec[stage]["test_acc"] <= 1.0 and rec[stage]["test_loss"] > 0
        assert set(rec["latency_ms"]) == {"b1", "b64"}
        assert rec["rounds"] == (2 if key[2] == "iterative" else 1)
    base = json.loads((tmp_path / "run/pretrained/digits-vgg_s0/metrics.json").read_text())
    assert all(rec["flops"] <= 0.6 * base["flops"] * 1.01 for rec in records)
    assert records[0]["delta_loss"]["predicted"] > 0  # EigenDamage predicts its damage
    assert records[1]["delta_loss"]["predicted"] is None  # l1 does not
    capsys.readouterr()
    protocol.run(cfg)  # nothing left to do: every cell is skipped
    assert "0 cells to run" in capsys.readouterr().out


def test_report_counts_finished_seeds_and_plots(protocol, tmp_path, monkeypatch) -> None:
    """The report of a (partial) run: one row per group with ``n`` finished of expected."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.setdefault("fmnist_protocol", protocol)
    import fmnist_report

    cfg = _config(tmp_path / "run")
    cfg["seeds"] = [0, 1]
    cfg["modes"] = ["one-pass"]
    cfg["methods"] = ["l1"]
    protocol.run(cfg, only=lambda key: key[1] == 0)  # seed 1 never ran
    groups, expected = fmnist_report.collect(cfg)
    rows = fmnist_report.table(groups, expected, "digits-vgg", "one-pass")
    assert len(rows) == 3 and "| l1 | 1/2 |" in rows[2]
    fmnist_report.plot(groups, "digits-vgg", "one-pass", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    fmnist_report.cost_plot(groups, "digits-vgg", "one-pass", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_later_seeds_run_the_narrowed_methods_and_no_ablation(protocol, tmp_path) -> None:
    cfg = _config(tmp_path / "run")
    cfg["seeds"] = [0, 1]
    cfg["variants"] = {"l1-ft3": {"method": "l1", "finetune": {"epochs": 3}}}
    cfg["ablation"] = {"models": ["digits-vgg"], "modes": ["one-pass"], "flops_kept": [0.6],
                       "variants": ["l1-ft3"]}  # fmt: skip
    cfg["later_seeds"] = {"digits-vgg": {"one-pass": ["eigendamage"]}}
    by_seed = {s: [k[2:] for k in protocol.cells(cfg) if k[1] == s] for s in (0, 1)}
    assert [k[2] for k in by_seed[0]] == ["eigendamage", "l1", "l1-ft3", "eigendamage"]
    assert by_seed[0][-1][0] == "iterative"
    assert by_seed[1] == [("one-pass", 0.6, "eigendamage")]  # no iterative, no ablation
    cfg["ablation"]["seeds"] = [0, 1]
    assert [k[4] for k in protocol.cells(cfg) if k[1] == 1] == ["eigendamage", "l1-ft3"]


def _record(seed: int, acc: float) -> dict:
    return {"seed": seed, "pruned": {"test_acc": acc}, "finetune_n": {"test_acc": acc}}


def test_verdicts_pair_seeds_and_need_every_seed_to_agree(protocol, monkeypatch) -> None:
    """Ahead/behind only when every common seed agrees in sign and the mean difference is
    at least half a point; seeds one side lacks are not compared."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.setdefault("fmnist_protocol", protocol)
    import fmnist_report

    assert fmnist_report.verdict([1.0, 2.0, 0.5]) == "ahead"
    assert fmnist_report.verdict([1.0, -0.2, 3.0]) == "level"  # one seed disagrees
    assert fmnist_report.verdict([-0.3, -0.4]) == "level"  # below half a point
    assert fmnist_report.verdict([-1.0]) == "behind"
    key = ("m", "one-pass", 0.5)
    groups = {
        (*key, "eigendamage"): [_record(0, 0.80), _record(1, 0.90), _record(2, 0.85)],
        (*key, "l1"): [_record(0, 0.78), _record(1, 0.88)],  # seed 2 missing
        (*key, "tp-l1"): [_record(0, 0.82), _record(1, 0.93), _record(2, 0.86)],
        (*key, "tp-random"): [_record(0, 0.70)],
    }
    rows = fmnist_report.verdicts(groups, "m", "one-pass", "finetune_n")
    assert rows[2] == ("| 0.5 | 3 | l1 +2.0 ± 0.0 (2), tp-random +10.0 (1) | – | "
                       "tp-l1 -2.0 ± 1.0 (3) | tp-l1: behind |")  # fmt: skip


@pytest.mark.parametrize("name", ["fmnist_cpu.json", "fmnist_gpu.json"])
def test_shipped_protocol_configs_name_real_methods_and_models(protocol, name) -> None:
    import inspect

    from eigendamage.methods import available_methods, run_pruning
    from eigendamage.models import list_models

    cfg = protocol.load_protocol(ROOT / "benchmarks" / "configs" / name)
    methods = set(available_methods())
    options = set(inspect.signature(run_pruning).parameters)
    for key in protocol.cells(cfg):
        method, prune_options, _ = protocol.resolve(cfg, key[4])
        assert method in methods and set(prune_options) <= options, key
        assert key[0] in list_models(), key
    assert cfg["flops_kept"] == [0.5, 0.3, 0.15, 0.1] and len(cfg["seeds"]) == 3
    assert cfg["iterative"]["rounds"] >= 5 and cfg["iterative"]["per_layer_cap"] == 0.5


def test_ablation_variants_and_latency_pass(protocol, tmp_path) -> None:
    """Variants change what they name (here the fine-tuning epochs and the Fisher batches);
    ``latency`` re-times every finished cell from its recorded architecture."""
    cfg = _config(tmp_path / "run")
    cfg["modes"] = ["one-pass"]
    cfg["methods"] = ["l1"]
    cfg["variants"] = {
        "l1-ft3": {"method": "l1", "finetune": {"epochs": 3}},
        "ed-fisher1": {"method": "eigendamage", "prune": {"fisher_batches": 1}},
    }
    cfg["ablation"] = {"models": ["digits-vgg"], "modes": ["one-pass"], "flops_kept": [0.6],
                       "variants": ["l1-ft3", "ed-fisher1"]}  # fmt: skip
    keys = list(protocol.cells(cfg))
    assert [k[4] for k in keys] == ["l1", "l1-ft3", "ed-fisher1"]
    assert protocol.resolve(cfg, "c-obd+norm") == ("c-obd", {"normalize": True}, {})
    protocol.run(cfg)
    records = {k[4]: json.loads(protocol.cell_path(cfg, *k).read_text()) for k in keys}
    assert records["l1"]["finetune_epochs"] == 2 and records["l1-ft3"]["finetune_epochs"] == 3
    assert records["ed-fisher1"]["delta_loss"]["predicted"] > 0
    protocol.retime(cfg, lambda key: True, repeats=2)
    timed = json.loads((tmp_path / "run/latency.json").read_text())
    assert set(timed["cells"]) == {
        str(protocol.cell_path(cfg, *k).relative_to(tmp_path / "run")) for k in keys
    }
    assert all(v["b1"] > 0 and v["b64"] > 0 for v in timed["cells"].values())
    assert set(timed["originals"]) == {"digits-vgg_s0"}


def test_a_cell_does_not_depend_on_the_cells_run_before_it(protocol, tmp_path) -> None:
    """The same cell run after another one, or alone in a fresh process state, gives the
    same numbers: its curvature and BN batches are drawn from its own seed."""
    records = []
    for name, only in (("after", lambda key: True), ("alone", lambda key: key[4] == "l1")):
        cfg = _config(tmp_path / name)
        cfg["modes"] = ["one-pass"]
        cfg["methods"] = ["eigendamage", "l1"]
        protocol.run(cfg, only=only)
        key = next(k for k in protocol.cells(cfg) if k[4] == "l1")
        records.append(json.loads(protocol.cell_path(cfg, *key).read_text()))
    for stage in ("pruned", "finetune_1", "finetune_n"):
        assert records[0][stage] == records[1][stage]
    assert records[0]["params"] == records[1]["params"]
