"""`eigendamage bench ...` on tiny workloads, and our factors against curvlinops and BackPACK
(skipped when those optional packages are not installed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from eigendamage.benchmarking.memory import peak_memory_mib
from eigendamage.benchmarking.workloads import markdown
from eigendamage.cli import app
from eigendamage.curvature import collect_kfac

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    return result.output


def table_rows(output: str) -> list[list[str]]:
    lines = [ln for ln in output.splitlines() if ln.startswith("| ") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_bench_kfac_prints_machine_settings_and_ratios():
    out = invoke("kfac", "-w", "digits-vgg", "--batches", "1", "--repeats", "1")
    assert out.startswith("# ") and "torch " in out and "settings:" in out
    header, row = table_rows(out)
    assert row[0] == "digits-vgg"
    ratio = row[header.index("channel / plain")]
    assert ratio.endswith("x") and float(ratio[:-1]) > 0


def test_bench_eigh_compares_against_the_sequential_float64_loop():
    out = invoke("eigh", "-w", "digits-vgg", "--repeats", "1", "--batch-size", "4")
    assert "of 4" in out and "'low-rank (side)': [" in out and "'low-rank (side)': []" not in out
    header, *rows = table_rows(out)
    ref = rows[0]
    assert ref[0].startswith("sequential loop") and ref[header.index("speed-up")] == "1.00x"
    errors = [float(r[header.index("max eigenvalue error / max lam")]) for r in rows]
    assert errors[0] == 0.0 and max(errors) < 1e-4  # fp32 variants within fp32 accuracy
    assert any("rank bounds (default)" in r[0] for r in rows)


def test_bench_prune_step_reports_every_stage():
    out = invoke("prune-step", "-w", "digits-vgg", "--batches", "2", "--batch-size", "16")
    header, row = table_rows(out)
    for stage in ("curvature s", "eigendecomposition s", "total s", "under 60 s"):
        assert stage in header
    assert row[header.index("under 60 s")] == "yes"


def test_unknown_workload_is_one_line_error():
    result = runner.invoke(app, ["bench", "kfac", "-w", "vgg91"])
    assert result.exit_code == 2
    assert "vgg91" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_peak_memory_probe_runs_in_a_fresh_process():
    assert 0 < peak_memory_mib("digits-vgg", "channel", 1) < 2000


def test_markdown_table():
    assert markdown([{"a": 1, "b": "x"}]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]


def reference_cases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 4),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return [
        (mlp, [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g))]),
        (cnn, [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))]),
    ]


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


@pytest.mark.parametrize("case", [0, 1])
def test_factors_equal_curvlinops_kfac_expand_empirical(case):
    curvlinops = pytest.importorskip("curvlinops")
    model, data = reference_cases()[case]
    model = model.double()
    data = [(x.double(), y) for x, y in data]
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        [p for m in layers(model).values() for p in m.parameters()],
        data,
        fisher_type="empirical",
        check_deterministic=False,
        separate_weight_and_bias=False,
        num_data=8,
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    ours = collect_kfac(model, data, fisher="empirical", dtype=torch.float64)
    for name in layers(model):
        torch.testing.assert_close(ours[name].A, op._input_covariances[name])
        torch.testing.assert_close(ours[name].S, op._gradient_covariances[name])


def test_input_factor_equals_backpack_up_to_the_location_count():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFAC

    model, data = reference_cases()[1]
    ours = collect_kfac(model, data, fisher="empirical")
    ext = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(KFAC()):
        loss(ext(data[0][0]), data[0][1]).backward()
    locations = {"0": 64, "2": 9, "4": 1}  # output H*W of each layer (1 for the Linear)
    for name, m in layers(ext).items():
        _, a = m.weight.kfac
        torch.testing.assert_close(ours[name].A_no_bias * locations[name], a)
