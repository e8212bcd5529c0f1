"""eigendamage-dw: CP-ALS convergence and exactness, the depthwise-separable module, the exact
densify rewrite used by later rounds, and the method end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigendamage.errors import ConfigError
from eigendamage.io import load_model, save_model
from eigendamage.measure import count
from eigendamage.methods import available_methods, prune, run_pruning
from eigendamage.models import create_model
from eigendamage.surgery.depthwise import (
    cp_als,
    densify,
    depthwise_separable,
    is_depthwise_core,
)
from eigendamage.surgery.eigenbasis import Factored
from eigendamage.surgery.eigenbasis import build_form as build


def cp_tensor(d_out: int, d_in: int, k: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (d_out, d_in, k))
    return torch.einsum("or,ir,kr->oik", a, b, c)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=2, dilation=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(24, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def batches(n: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def test_als_error_never_increases_and_drops():
    t = torch.randn(12, 10, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = cp_als(t, 10, iterations=40).errors
    assert len(errors) == 40
    assert all(b <= a + 1e-10 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0]


def test_als_recovers_exact_cp_rank_tensor():
    t = cp_tensor(7, 5, 9, rank=5)
    cp = cp_als(t, 5, iterations=300, seed=3)
    assert cp.error < 1e-4
    assert torch.allclose(cp.full(), t, atol=1e-4 * t.norm())
    assert torch.allclose(cp.out.norm(dim=0), torch.ones(5, dtype=torch.float64))


def test_depthwise_module_matches_the_core_function():
    c_in, c_out, d_in, d_out = 6, 9, 5, 7
    g = torch.Generator().manual_seed(0)
    template = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
    f = Factored(
        p_in=torch.randn(d_in, c_in, generator=g, dtype=torch.float64),
        core=cp_tensor(d_out, d_in, 9, rank=min(d_out, d_in)),
        p_out=torch.randn(c_out, d_out, generator=g, dtype=torch.float64),
        bias=torch.randn(c_out, generator=g, dtype=torch.float64),
        template=template.double(),
    )
    cp = cp_als(f.core, min(d_out, d_in), iterations=300, seed=3)
    dw = depthwise_separable(f, cp)
    assert is_depthwise_core(dw)
    assert dw.core.groups == 5 and dw.rot_in.out_channels == 5 and dw.rot_out.in_channels == 5
    x = torch.randn(2, c_in, 9, 9, generator=g, dtype=torch.float64)
    want = build(f, "full")(x)
    got = dw(x)
    assert got.shape == want.shape
    assert (got - want).norm() / want.norm() < 1e-4


def test_densify_is_exact():
    model = prune(conv_net(), batches(), method="eigendamage-dw", ratio=0.3, fisher_batches=1)
    assert any(is_depthwise_core(m) for m in model.modules())
    dense = densify(model)
    assert not any(is_depthwise_core(m) for m in dense.modules())
    x = batches()[0][0]
    model.eval(), dense.eval()
    assert torch.allclose(dense(x), model(x), atol=1e-5)


def test_method_prunes_to_a_smaller_runnable_model(tmp_path):
    assert "eigendamage-dw" in available_methods()
    torch.manual_seed(0)
    original = create_model("digits-vgg", widths=(16, 16, "M", 24, 24))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    result = run_pruning(original, data, method="eigendamage-dw", ratio=0.3, rounds=2)
    model = result.model.eval()
    assert result.after.params < result.before.params
    assert result.after.flops < result.before.flops
    depthwise = [n for n, m in model.named_modules() if is_depthwise_core(m)]
    assert depthwise  # the k x k convs with >= 9 channels on both sides
    assert "features.0" not in depthwise  # the 1-channel stem keeps the plain form
    errors = result.rounds[-1].detail["cp_error"]
    assert errors and all(0.0 <= e < 1.0 for e in errors.values())
    assert model(x).shape == (16, 10)
    save_model(model, tmp_path / "m")
    assert torch.allclose(load_model(tmp_path / "m").eval()(x), model(x), atol=1e-6)


def test_flops_budget_is_met_or_refused():
    model, data = conv_net(), batches()
    before = count(model, (1, 3, 8, 8)).flops
    result = run_pruning(model, data, method="eigendamage-dw", target_flops=0.1)
    # a net this small has coarse steps in FLOPs: near the target, not within 1%
    assert result.after.flops == pytest.approx(0.1 * before, rel=0.1)
    with pytest.raises(ConfigError, match="unreachable for eigendamage-dw"):
        run_pruning(model, data, method="eigendamage-dw", target_flops=0.9)
