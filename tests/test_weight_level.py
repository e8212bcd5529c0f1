"""Weight-level OBD / OBS under K-FAC: closed forms, the OBS update, masks and sparsity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigendamage.criteria import weight_prune, weight_scores
from eigendamage.curvature import KFactors
from eigendamage.errors import ConfigError

DAMPING = 1e-3


def _psd(gen: torch.Generator, n: int) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    return x @ x.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def _factors(model: nn.Module, seed: int = 0) -> dict[str, KFactors]:
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


def _damp(m: torch.Tensor) -> torch.Tensor:
    return m + DAMPING * m.diagonal().mean() * torch.eye(len(m), dtype=m.dtype)


def _matrix(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach().flatten(1).double()
    return torch.cat([w, m.bias.detach().double()[:, None]], 1) if m.bias is not None else w


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4, bias=False))


def test_scores_closed_forms(net) -> None:
    factors = _factors(net)
    obd = weight_scores(net, factors, "obd")
    obs = weight_scores(net, factors, "obs", damping=DAMPING)
    diag = weight_scores(net, factors, "obd", diag=True)
    for name in ("0", "2"):
        f, m = factors[name], net.get_submodule(name)
        w = _matrix(m)
        cols = m.weight[0].numel()
        h = torch.kron(f.A, f.S)  # column-major vec(W): entry (i, j) sits at j * out + i
        h_inv = torch.linalg.inv(torch.kron(_damp(f.A), _damp(f.S)))
        out = len(w)
        hqq = h.diagonal().reshape(-1, out).T
        hinv_qq = h_inv.diagonal().reshape(-1, out).T
        torch.testing.assert_close(obd[name].flatten(1), (0.5 * w**2 * hqq)[:, :cols])
        torch.testing.assert_close(obs[name].flatten(1), (0.5 * w**2 / hinv_qq)[:, :cols])
        torch.testing.assert_close(diag[name].flatten(1), (0.5 * w**2 * f.extra["diag"])[:, :cols])
        assert obd[name].shape == m.weight.shape


def test_weight_prune_masks_and_sparsity(net) -> None:
    factors = _factors(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned, info = weight_prune(net, None, "obd", 0.5, factors=factors)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    total = sum(net.get_submodule(n).weight.numel() for n in factors)
    assert info["total_weights"] == total and info["pruned_weights"] == total // 2
    assert info["sparsity"] == pytest.approx((total // 2) / total)
    for name, keep in info["masks"].items():
        w = pruned.get_submodule(name).weight
        assert keep.shape == w.shape
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
        torch.testing.assert_close(w[keep], net.get_submodule(name).weight[keep])
    torch.testing.assert_close(pruned[0].bias, net[0].bias)
    scores = weight_scores(net, factors, "obd")
    removed = torch.cat([scores[n][~info["masks"][n]] for n in scores])
    kept = torch.cat([scores[n][info["masks"][n]] for n in scores])
    assert removed.max() <= kept.min()  # one global threshold
    assert info["threshold"] == pytest.approx(float(removed.max()))


def test_per_layer_cap(net) -> None:
    _, info = weight_prune(net, None, "obd", 1.0, factors=_factors(net), per_layer_cap=0.6)
    assert all(s <= 0.6 for s in info["per_layer_sparsity"].values())


def test_obs_update_sums_single_weight_updates_and_beats_zeroing() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 4))
    factors = _factors(net, seed=3)
    f, w = factors["0"], _matrix(net[0])
    a, s = _damp(f.A), _damp(f.S)
    h_inv = torch.linalg.inv(torch.kron(a, s))

    def q(delta: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.trace(delta.T @ s @ delta @ a)

    pruned, info = weight_prune(net, None, "obs", 0.3, factors=factors, damping=DAMPING)
    gone = ~info["masks"]["0"]
    theta = w.T.reshape(-1)  # column-major vec
    delta = torch.zeros_like(theta)
    for i, j in gone.nonzero().tolist():
        q_idx = j * len(w) + i
        delta -= theta[q_idx] * h_inv[:, q_idx] / h_inv[q_idx, q_idx]
    expected = w + delta.reshape(-1, len(w)).T
    expected[:, :5][gone] = 0
    torch.testing.assert_close(_matrix(pruned[0]), expected, atol=1e-5, rtol=0)
    # a single weight: the OBS update is optimal, so it never loses to plain zeroing
    scores = weight_scores(net, factors, "obs", damping=DAMPING)["0"]
    one, info = weight_prune(net, None, "obs", 1 / 20, factors=factors, damping=DAMPING)
    assert info["pruned_weights"] == 1
    change = _matrix(one[0]) - w
    gone = torch.cat([~info["masks"]["0"], torch.zeros(4, 1, dtype=torch.bool)], 1)
    zeroed = torch.where(gone, -w, 0.0)
    assert q(change) <= q(zeroed) + 1e-9
    torch.testing.assert_close(q(change), scores.min(), atol=1e-6, rtol=1e-4)


def test_bad_arguments(net) -> None:
    factors = _factors(net)
    with pytest.raises(ConfigError, match="one of"):
        weight_prune(net, None, "obx", 0.5, factors=factors)
    with pytest.raises(ConfigError, match="obd"):
        weight_prune(net, None, "obs", 0.5, factors=factors, diag=True)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        weight_prune(net, None, "obd", 1.5, factors=factors)


@pytest.mark.parametrize(("method", "diag"), [("obd", False), ("obd", True), ("obs", False)])
def test_end_to_end_with_collected_factors(method, diag) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4)
    ).eval()
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 4, 4, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    pruned, info = weight_prune(net, loader, method, 0.6, diag=diag)
    assert info["sparsity"] == pytest.approx(0.6, abs=1 / info["total_weights"])
    assert torch.isfinite(pruned(torch.randn(2, 3, 4, 4))).all()
    zeros = sum(int((pruned.get_submodule(n).weight == 0).sum()) for n in info["masks"])
    assert zeros >= info["pruned_weights"]
