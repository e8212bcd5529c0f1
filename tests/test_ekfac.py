"""The EKFAC diagonal equals the exact Fisher diagonal of the rotated core weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from eigendamage.criteria.eigendamage import eigendamage_targets
from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.curvature.ekfac import kfe_diagonal
from eigendamage.methods import run_pruning
from eigendamage.surgery.eigenbasis import to_eigenbasis


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    return model, [(x[:3], y[:3]), (x[3:], y[3:])], x, y


def test_ekfac_diagonal_is_the_exact_diagonal_in_the_eigenbasis():
    model, loader, x, y = model_and_data()
    targets = eigendamage_targets(model, {"5"})
    factors = collect_kfac(
        model,
        loader,
        fisher="empirical",
        conv_mode="channel",
        modules=targets,
        dtype=torch.float64,
    )
    kfe = eigendecompose(factors, drop_bias=True)
    diag = kfe_diagonal(model, loader, kfe, fisher="empirical", dtype=torch.float64)
    rotated = to_eigenbasis(model, kfe)
    params = {k: v.detach() for k, v in rotated.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(rotated, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for name in targets:
        exact = per_example[f"{name}.core.weight"].square().mean(0)
        exact = exact.reshape(exact.shape[0], exact.shape[1], -1)
        torch.testing.assert_close(diag[name], exact)
    # and it differs from the K-FAC eigenvalue products (else the test would be vacuous)
    assert not torch.allclose(diag["3"][..., 0], kfe["3"].diag)


def test_pruning_with_ekfac_eigenvalues_runs():
    model, loader, _, _ = model_and_data()
    result = run_pruning(
        model.float(),
        [(a.float(), b) for a, b in loader],
        ratio=0.8,
        eigenvalues="ekfac",
        input_shape=(1, 3, 8, 8),
    )
    assert result.after.params < result.before.params
