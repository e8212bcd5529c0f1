"""The same code paths on CUDA: factors, eigenbases, pruning, surgery, training, latency.

Every test compares the CUDA result with the CPU result of the same code on the same data
(or checks the invariant the CPU tests check).  Skipped when no GPU is present (CI has none).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.latency import run_latency_bench
from eigendamage.measure import count
from eigendamage.methods import run_pruning
from eigendamage.surgery.eigenbasis import to_eigenbasis

# EIGENDAMAGE_TEST_DEVICE=cpu dry-runs this file's logic on a machine without a GPU.
DEVICE = os.environ.get("EIGENDAMAGE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def net(groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()


def batches(n: int = 3, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))]
    out += [
        (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))
        for _ in range(n - 1)
    ]
    return [(x.to(device), y.to(device)) for x, y in out]


@pytest.mark.parametrize("conv_mode", ["patch", "channel"])
def test_factors_on_cuda_equal_cpu_factors(conv_mode):
    model = net(groups=2).double()
    kw = dict(
        fisher="empirical", conv_mode=conv_mode, diag=conv_mode == "patch", dtype=torch.float64
    )
    cpu = collect_kfac(model, [(x.double(), y) for x, y in batches()], **kw)
    gpu_model = copy.deepcopy(model).to(DEVICE)
    gpu = collect_kfac(
        gpu_model, [(x.double().to(DEVICE), y.to(DEVICE)) for x, y in batches()], **kw
    )
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert on_device(gpu[name].A) and on_device(gpu[name].S)
        torch.testing.assert_close(gpu[name].A.cpu(), cpu[name].A, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(gpu[name].S.cpu(), cpu[name].S, rtol=1e-7, atol=1e-10)


def test_true_fisher_on_cuda_is_seeded_and_eigenbases_match_cpu():
    model = net().to(DEVICE)
    data = batches(device=DEVICE)
    first = collect_kfac(model, data, conv_mode="channel", seed=5)
    again = collect_kfac(model, data, conv_mode="channel", seed=5)
    for name in first:
        assert torch.equal(first[name].S, again[name].S)  # label draws repeat on the GPU
    kfe_gpu = eigendecompose(first, drop_bias=True)
    cpu_factors = {n: replace(f, A=f.A.cpu(), S=f.S.cpu()) for n, f in first.items()}
    kfe_cpu = eigendecompose(cpu_factors, drop_bias=True)
    for name in kfe_cpu:
        assert on_device(kfe_gpu[name].A.Q)
        for side in ("A", "S"):
            lam_gpu = getattr(kfe_gpu[name], side).lam.cpu()
            lam_cpu = getattr(kfe_cpu[name], side).lam
            torch.testing.assert_close(lam_gpu, lam_cpu, rtol=1e-4, atol=1e-6)


def test_reparameterisation_on_cuda_leaves_outputs_unchanged():
    model = net().to(DEVICE)
    data = batches(device=DEVICE)
    kfe = eigendecompose(collect_kfac(model, data, conv_mode="channel"), drop_bias=True)
    rotated = to_eigenbasis(model, kfe).eval()
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["eigendamage", "c-obs", "kron-obd", "l1"])
def test_pruning_on_cuda_builds_a_smaller_model_on_cuda(method):
    model = net().to(DEVICE)
    data = batches(device=DEVICE)
    result = run_pruning(model, data, method=method, ratio=0.5, input_shape=(1, 3, 8, 8))
    pruned = result.model
    assert all(on_device(p) for p in pruned.parameters())
    assert count(pruned.cpu(), (1, 3, 8, 8)).params < count(net(), (1, 3, 8, 8)).params
    with torch.no_grad():
        assert torch.isfinite(pruned.to(DEVICE).eval()(data[0][0])).all()


def test_prune_cli_on_cuda_fine_tunes_and_writes_the_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eigendamage.cli", "prune", "--model", "digits-vgg"]
    cmd += ["--data", "digits", "--method", "eigendamage", "--ratio", "0.5", "--rounds", "2"]
    cmd += ["--finetune-epochs", "2", "--device", DEVICE, "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["params"] < metrics["before"]["params"]
    config = json.loads((out / "config.json").read_text())
    assert DEVICE in json.dumps(config)


def test_latency_bench_times_cuda_models():
    model = net().to(DEVICE)
    pruned = run_pruning(model, batches(device=DEVICE), ratio=0.5, input_shape=(1, 3, 8, 8)).model
    (row,) = run_latency_bench(
        {"original": model, "pruned": pruned},
        baseline="original",
        input_shape=(1, 3, 8, 8),
        batch_sizes=(4,),
        device=DEVICE,
        warmup=2,
        repeats=5,
        rounds=2,
    )
    assert row.device.startswith(DEVICE) and row.batch_size == 4
    assert set(row.ms) >= {"original", "pruned"} and all(ms > 0 for ms in row.ms.values())
    assert row.flops_reduction["pruned"] > 0
