"""Channel criteria (c-obd, c-obs, kron-obd(-orig), kron-obs, l1, random, slimming) and
``channel_prune``: closed forms on one Linear layer, OBS optimality, surgery equivalence,
budgets and caps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigendamage.criteria import CRITERIA, ScoreContext, get_criterion
from eigendamage.criteria.channel_hessian import kron_obs_update
from eigendamage.curvature import KFactors
from eigendamage.errors import ConfigError
from eigendamage.methods.channel import channel_prune
from eigendamage.structure import ChannelGroups, mask_channels

DAMPING = 1e-3
HESSIAN = ["c-obd", "c-obs", "kron-obd", "kron-obs"]
X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class ComboNet(nn.Module):
    """Residual identity block, 1x1-conv shortcut block, concat, depthwise conv, biases."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.r1 = nn.Conv2d(8, 8, 3, padding=1)
        self.rbn1 = nn.BatchNorm2d(8)
        self.short = nn.Conv2d(8, 12, 1, bias=False)
        self.sbn = nn.BatchNorm2d(12)
        self.r2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.rbn2 = nn.BatchNorm2d(12)
        self.left = nn.Conv2d(12, 6, 1)
        self.right = nn.Conv2d(12, 5, 3, padding=1)
        self.dw = nn.Conv2d(11, 11, 3, padding=1, groups=11)
        self.dbn = nn.BatchNorm2d(11)
        self.fc = nn.Linear(11, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.rbn1(self.r1(x)))
        x = torch.relu(self.sbn(self.short(x)) + self.rbn2(self.r2(x)))
        x = torch.cat([self.left(x), torch.relu(self.right(x))], 1)
        return self.fc(torch.relu(self.dbn(self.dw(x))).mean((2, 3)))


class Wide(nn.Module):
    """Wide enough that one channel is well under 1% of a budget."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        layers, c = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU())
            c = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _psd(gen: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randn(*shape, 2 * shape[-1], generator=gen, dtype=torch.float64)
    return x @ x.transpose(-1, -2) / shape[-1] + 0.1 * torch.eye(shape[-1], dtype=torch.float64)


def fake_factors(model: nn.Module, seed: int = 0) -> dict[str, KFactors]:
    """Random PSD K-FAC factors with the real layouts (grouped, bias coordinate, diag)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d | nn.Linear):
            continue
        g = getattr(m, "groups", 1)
        d = m.weight[0].numel() + (m.bias is not None)
        a, s = _psd(gen, g, d), _psd(gen, g, len(m.weight) // g)
        out[name] = KFactors(
            A=a[0] if g == 1 else a,
            S=s[0] if g == 1 else s,
            kind="linear" if isinstance(m, nn.Linear) else "conv_patch",
            has_bias=m.bias is not None,
            groups=g,
            extra={"diag": torch.rand(len(m.weight), d, generator=gen, dtype=torch.float64)},
        )
    return out


def _bn_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def combo() -> tuple[nn.Module, dict[str, KFactors], ChannelGroups]:
    torch.manual_seed(0)
    model = _bn_stats(ComboNet())
    return model, fake_factors(model), ChannelGroups.build(model, X)


@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_every_method_prunes_to_the_masked_model(method, combo) -> None:
    model, factors, groups = combo
    pruned, info = channel_prune(
        model, None, method=method, ratio=0.5, example_inputs=X, factors=factors, obs_update=False
    )
    assert type(pruned) is ComboNet
    assert info["params"][1] < info["params"][0] == sum(p.numel() for p in model.parameters())
    for g in groups:
        kept = len(info["keep"].get(g.id, range(g.size)))
        assert kept >= max(1, g.size - int(0.95 * g.size))
    masked = mask_channels(model, groups, info["keep"]).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["c-obs", "kron-obs"])
def test_obs_update_changes_surviving_weights(method, combo) -> None:
    model, factors, _ = combo
    kw = dict(method=method, ratio=0.4, example_inputs=X, factors=factors)
    plain, _ = channel_prune(model, None, obs_update=False, **kw)
    updated, info = channel_prune(model, None, **kw)
    assert info["params"][1] == sum(p.numel() for p in updated.parameters())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x), updated.eval()(x))


# -- one Linear layer with known A, S, W ---------------------------------------------------


def _q(delta: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Quadratic loss increase ``1/2 tr(D^T S D A)`` = ``1/2 vec(D)^T (A (x) S) vec(D)``."""
    return 0.5 * torch.trace(delta.T @ s @ delta @ a)


def _damp(m: torch.Tensor) -> torch.Tensor:
    return m + DAMPING * m.diagonal().mean() * torch.eye(len(m), dtype=m.dtype)


@pytest.fixture
def linear() -> tuple[nn.Module, KFactors, torch.Tensor, ScoreContext]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5))
    f = fake_factors(model, seed=2)["0"]
    w = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach().double()
    return model, f, w, ScoreContext(layers=["0"], factors={"0": f}, damping=DAMPING)


def test_obd_scores_closed_forms(linear) -> None:
    model, f, w, ctx = linear
    a, s = f.A, f.S
    kron = get_criterion("kron-obd").score(model, ctx)["0"]
    zero_row = [_q(torch.where(torch.arange(5)[:, None] == i, -w, 0.0), a, s) for i in range(5)]
    torch.testing.assert_close(kron, torch.stack(zero_row))
    orig = get_criterion("kron-obd-orig").score(model, ctx)["0"]
    torch.testing.assert_close(orig, 0.5 * s.diagonal() * ((w * w) @ a).sum(1))
    cobd = get_criterion("c-obd").score(model, ctx)["0"]
    torch.testing.assert_close(cobd, 0.5 * (w**2 * f.extra["diag"]).sum(1))


def test_c_obs_score_and_update_closed_form(linear) -> None:
    model, f, w, ctx = linear
    a_inv, s_inv = torch.linalg.inv(_damp(f.A)), torch.linalg.inv(_damp(f.S))
    h_inv = s_inv.diagonal()[:, None] * a_inv.diagonal()[None]
    score = get_criterion("c-obs").score(model, ctx)["0"]
    torch.testing.assert_close(score, 0.5 * (w**2 / h_inv).sum(1))
    rows = torch.tensor([1, 3])
    delta = get_criterion("c-obs").update(model, ctx, {"0": rows})["0"]
    c = torch.zeros_like(w)
    c[rows] = w[rows] / h_inv[rows]
    torch.testing.assert_close(delta, -s_inv @ c @ a_inv)


def test_c_obs_update_beats_zeroing_with_diagonal_a(linear) -> None:
    """With a diagonal A the per-weight OBS updates of one row add up to the exact row OBS."""
    model, f, w, _ = linear
    f.A = torch.diag(f.A.diagonal())
    ctx = ScoreContext(layers=["0"], factors={"0": f}, damping=DAMPING)
    a, s = _damp(f.A), _damp(f.S)
    crit = get_criterion("c-obs")
    for row in range(5):
        delta = crit.update(model, ctx, {"0": torch.tensor([row])})["0"]
        delta[row] = -w[row]
        zeroed = torch.zeros_like(w)
        zeroed[row] = -w[row]
        assert _q(delta, a, s) <= _q(zeroed, a, s) + 1e-12
        torch.testing.assert_close(_q(delta, a, s), crit.score(model, ctx)["0"][row])


def test_kron_obs_update_is_the_constrained_least_squares_solution(linear) -> None:
    model, f, w, ctx = linear
    a, s = _damp(f.A), _damp(f.S)
    removed = torch.tensor([0, 2, 3])
    delta = get_criterion("kron-obs").update(model, ctx, {"0": removed})["0"]
    # brute force: minimise 1/2 vec(D)^T (A (x) S) vec(D) over the free entries (column-major vec)
    h = torch.kron(a, s)
    fixed = torch.zeros(w.shape, dtype=torch.bool)
    fixed[removed] = True
    fixed_v, d = fixed.T.reshape(-1), (-w).T.reshape(-1)
    free = ~fixed_v
    sol = torch.linalg.solve(h[free][:, free], -h[free][:, fixed_v] @ d[fixed_v])
    brute = torch.zeros_like(d)
    brute[free], brute[fixed_v] = sol, d[fixed_v]
    best = delta.clone()
    best[removed] = -w[removed]
    torch.testing.assert_close(best.T.reshape(-1), brute)
    zeroed = torch.where(fixed, -w, 0.0)
    assert _q(best, a, s) <= _q(zeroed, a, s)
    # one row at a time, the score is the loss increase after the update
    score = get_criterion("kron-obs").score(model, ctx)["0"]
    for row in range(5):
        one = get_criterion("kron-obs").update(model, ctx, {"0": torch.tensor([row])})["0"]
        one[row] = -w[row]
        torch.testing.assert_close(_q(one, a, s), score[row])


def test_kron_obs_update_grouped_blocks() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    s_inv = torch.linalg.inv(_psd(gen, 3, 4))
    removed = torch.zeros(3, 4, dtype=torch.bool)
    removed[0, 1] = removed[2, 0] = removed[2, 3] = True
    delta = kron_obs_update(w, s_inv, removed)
    assert torch.equal(delta[1], torch.zeros(4, 5, dtype=torch.float64))
    p = torch.tensor([0, 3])
    expected = -s_inv[2][:, p] @ torch.linalg.inv(s_inv[2][p][:, p]) @ w[2][p]
    torch.testing.assert_close(delta[2], expected)


# -- budgets, caps, errors ----------------------------------------------------------------


@pytest.fixture(scope="module")
def wide() -> nn.Module:
    torch.manual_seed(0)
    return Wide().eval()


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_lands_within_one_percent(kind, wide) -> None:
    x = torch.randn(1, 3, 6, 6)
    pruned, info = channel_prune(
        wide, None, method="l1", example_inputs=x, **{f"target_{kind}": 0.3}
    )
    before, after = info[kind]
    assert abs(after / before / 0.3 - 1) <= 0.01
    assert sum(p.numel() for p in pruned.parameters()) == info["params"][1]


def test_unreachable_budget_raises(wide) -> None:
    with pytest.raises(ConfigError, match=r"per_layer_cap=0\.5.*kept fraction 0\.\d+"):
        channel_prune(
            wide, None, method="l1", example_inputs=X, target_params=0.05, per_layer_cap=0.5
        )


def test_too_coarse_budget_takes_the_nearest_model_under_it(combo) -> None:
    """Issue 13: this used to raise "cannot be met"; a budget is now a ceiling."""
    model = combo[0]
    _, info = channel_prune(
        model, None, method="l1", example_inputs=X, target_params=0.5, tolerance=1e-6
    )
    before, after = info["params"]
    assert after <= 0.5 * before and info["target_reached"] == after / before / 0.5


def test_cap_and_best_channel_kept(combo) -> None:
    model, factors, groups = combo
    _, info = channel_prune(
        model, None, method="l1", ratio=1.0, per_layer_cap=0.5, example_inputs=X
    )
    for g in groups:
        removed = g.size - len(info["keep"].get(g.id, range(g.size)))
        assert removed <= int(0.5 * g.size)
    _, info = channel_prune(
        model, None, method="l1", ratio=1.0, per_layer_cap=1.0, example_inputs=X
    )
    for gid, kept in info["keep"].items():
        scores = info["group_scores"][gid]
        if len(groups[gid].roots) == 1:  # one root: exactly its best channel survives
            assert kept.tolist() == [int(scores.argmax())]
        assert len(kept) >= 1


def test_random_is_seeded(combo) -> None:
    model, _, _ = combo
    keeps = [
        channel_prune(model, None, method="random", ratio=0.5, example_inputs=X, seed=s)[1]["keep"]
        for s in (0, 0, 1)
    ]
    same = all(torch.equal(keeps[0][g], keeps[1][g]) for g in keeps[0])
    assert same and not all(torch.equal(keeps[0][g], keeps[2][g]) for g in keeps[0])


def test_bad_arguments() -> None:
    model = ComboNet()
    with pytest.raises(ConfigError, match="Did you mean 'kron-obs'"):
        channel_prune(model, None, method="kron-ob", ratio=0.5, example_inputs=X)
    with pytest.raises(ConfigError, match="exactly one"):
        channel_prune(model, None, method="l1", ratio=0.5, target_params=0.5, example_inputs=X)
    with pytest.raises(ConfigError, match="data loader"):
        channel_prune(model, None, method="kron-obd", ratio=0.5, example_inputs=X)
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ConfigError, match="BatchNorm"):
        channel_prune(no_bn, None, method="slimming", ratio=0.5, example_inputs=X)


# -- end to end through collect_kfac ------------------------------------------------------


@pytest.mark.parametrize("method", HESSIAN)
def test_end_to_end_with_collected_factors(method) -> None:
    torch.manual_seed(0)
    model = _bn_stats(ComboNet())
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    pruned, info = channel_prune(
        model, loader, method=method, ratio=0.4, example_inputs=X, obs_update=False
    )
    masked = mask_channels(model, ChannelGroups.build(model, X), info["keep"]).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked(x), atol=1e-5, rtol=0)
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in info["scores"].values())
    if method.endswith("obs"):
        updated, _ = channel_prune(model, loader, method=method, ratio=0.4, example_inputs=X)
        assert torch.isfinite(updated.eval()(x)).all()


def test_prune_round_adapter_for_the_pruning_loop(wide) -> None:
    from eigendamage.measure import count
    from eigendamage.methods import prune_round

    shape = (1, 3, 6, 6)
    common = dict(
        input_shape=shape,
        per_layer_cap=0.95,
        fisher="true",
        fisher_batches=None,
        fisher_samples=1,
        damping=DAMPING,
        exclude={"fc"},
        seed=0,
        device=None,
    )
    goal = 0.5 * count(wide, shape).params
    pruned, info = prune_round(
        wide, None, method="l1", ratio=None, target=("params", goal), **common
    )
    assert abs(info.params / goal - 1) <= 0.01 and info.params == count(pruned, shape).params
    model = _bn_stats(ComboNet())
    loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]
    common["input_shape"] = (1, 3, 8, 8)
    pruned, info = prune_round(model, loader, method="obd", ratio=0.5, target=None, **common)
    assert info.ratio == pytest.approx(0.5, abs=0.01) and "fc" not in info.detail["masks"]
    with pytest.raises(ConfigError, match="weight-level"):
        prune_round(model, loader, method="obs", ratio=None, target=("params", 1e3), **common)


def test_layers_with_factors_too_wide_to_invert_are_left_unscored(monkeypatch) -> None:
    """K-FAC criteria invert dense float64 factors: a layer wider than ``MAX_SIDE`` (VGG's
    25088-input Linear) is kept whole instead of exhausting memory."""
    import eigendamage.methods.channel as cp

    monkeypatch.setattr(cp, "MAX_SIDE", 100)  # "right": 12 x 3 x 3 + bias = 109 > 100
    torch.manual_seed(0)
    model = _bn_stats(ComboNet())
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    pruned, info = channel_prune(model, loader, method="kron-obs", ratio=0.3, example_inputs=X)
    assert "right" not in info["scores"] and "left" in info["scores"]
    masked = mask_channels(model, ChannelGroups.build(model, X), info["keep"]).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(pruned.eval()(x)).all()
        assert pruned(x).shape == masked(x).shape
