"""EigenDamage: exact reparameterisation, exact folding of the pruned forms, scores against
their definition, global ranking, caps, iterative merging without stacked bottlenecks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eigendamage.criteria.eigendamage import (
    apply_plan,
    direction_scores,
    eigendamage_targets,
    plan_pruning,
    rotated_layers,
)
from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.errors import ConfigError
from eigendamage.measure import count
from eigendamage.methods import run_pruning
from eigendamage.surgery.eigenbasis import (
    KFEBottleneck,
    form_params,
    to_eigenbasis,
)
from eigendamage.surgery.eigenbasis import build_form as build
from eigendamage.surgery.eigenbasis import keep_directions as select


def net(w=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8 * w, 3, padding=1, bias=False),
        nn.BatchNorm2d(8 * w),
        nn.ReLU(),
        nn.Conv2d(8 * w, 12 * w, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(12 * w, 12 * w, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48 * w, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def kfe_of(model, loader, exclude=("11",)):
    targets = eigendamage_targets(model, set(exclude))
    factors = collect_kfac(model, loader, conv_mode="channel", modules=targets)
    return eigendecompose(factors, drop_bias=True)


def test_reparameterisation_preserves_outputs_and_leaves_model_alone():
    model = net().eval()
    loader = data()
    kfe = kfe_of(model, loader)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rot = to_eigenbasis(model, kfe).eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(rot(x), model(x), atol=1e-5, rtol=1e-4)
    assert sum(isinstance(m, KFEBottleneck) for m in rot.modules()) == len(kfe) == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, KFEBottleneck) for m in model.modules())


@pytest.mark.parametrize("form", ["full", "fold_out", "fold_in", "dense"])
def test_every_form_of_a_pruned_layer_is_the_same_function(form):
    model = net().eval()
    kfe = kfe_of(model, data())
    rotated = rotated_layers(model, kfe)
    f = rotated["3"]
    kept = select(f, torch.tensor([0, 2, 5, 7]), torch.tensor([1, 3, 4, 8, 11]))
    reference = build(kept, "full").eval()
    candidate = build(kept, form).eval()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(candidate(x), reference(x), atol=1e-5, rtol=1e-4)
    params = sum(p.numel() for n, p in candidate.named_parameters() if "bias" not in n)
    assert params == form_params(kept, form)


def test_scores_are_the_obd_damage_in_the_eigenbasis():
    model = net().eval()
    kfe = kfe_of(model, data())
    rotated = rotated_layers(model, kfe)
    f, basis = rotated["9"], kfe["9"]
    s = direction_scores(f, basis)
    w = f.core[..., 0]
    expected = 0.5 * w**2 * torch.outer(basis.S.lam, basis.A.lam).double()
    torch.testing.assert_close(s.inputs, expected.sum(0))
    torch.testing.assert_close(s.outputs, expected.sum(1))
    # Removing a direction costs what the quadratic model predicts: the Fisher-weighted
    # squared change of the (dense) weight.
    i = 3
    dense = f.p_out @ w @ f.p_in
    pruned = (
        f.p_out
        @ w[:, [k for k in range(w.shape[1]) if k != i]]
        @ f.p_in[[k for k in range(w.shape[1]) if k != i]]
    )
    delta = (dense - pruned).double()
    a = f.p_in.T @ torch.diag(basis.A.lam.double()) @ f.p_in
    s_ = f.p_out @ torch.diag(basis.S.lam.double()) @ f.p_out.T
    quad = 0.5 * torch.trace(delta.T @ s_ @ delta @ a)
    torch.testing.assert_close(quad, s.inputs[i])


def test_predicted_loss_is_the_quadratic_model_of_the_whole_weight_change():
    """The plan's predicted Delta L equals 1/2 tr(dW^T S dW A) of the removed rows and columns
    together, computed in the dense parameterisation (a weight in a removed row *and* a
    removed column is counted once)."""
    model = net().eval()
    kfe = kfe_of(model, data())
    rotated = {"9": rotated_layers(model, kfe)["9"]}
    scores = {"9": direction_scores(rotated["9"], kfe["9"])}
    plan = plan_pruning(rotated, scores, ratio=0.4, per_layer_cap=1.0)
    lp, f, basis = plan.layers["9"], rotated["9"], kfe["9"]
    assert lp.form != "dense" and lp.keep_in.numel() < 48 and lp.keep_out.numel() < 16
    w = f.core[..., 0].double()
    kept = torch.zeros_like(w)
    rows, cols = lp.keep_out[:, None], lp.keep_in[None, :]
    kept[rows, cols] = w[rows, cols]
    delta = f.p_out.double() @ (w - kept) @ f.p_in.double()
    a = f.p_in.T.double() @ torch.diag(basis.A.lam.double()) @ f.p_in.double()
    s_ = f.p_out.double() @ torch.diag(basis.S.lam.double()) @ f.p_out.T.double()
    quad = 0.5 * torch.trace(delta.T @ s_ @ delta @ a)
    dropped_in = torch.ones(48, dtype=torch.bool)
    dropped_in[lp.keep_in] = False
    dropped_out = torch.ones(16, dtype=torch.bool)
    dropped_out[lp.keep_out] = False
    naive = scores["9"].inputs[dropped_in].sum() + scores["9"].outputs[dropped_out].sum()
    assert plan.predicted_delta_loss == pytest.approx(float(quad), rel=1e-9)
    assert plan.predicted_delta_loss < float(naive)  # the overlap is not counted twice


def test_global_threshold_prunes_the_lowest_fraction_and_respects_caps():
    model = net().eval()
    kfe = kfe_of(model, data())
    rotated = rotated_layers(model, kfe)
    scores = {n: direction_scores(rotated[n], kfe[n]) for n in kfe}
    total = sum(s.inputs.numel() + s.outputs.numel() for s in scores.values())
    plan = plan_pruning(rotated, scores, ratio=0.5, per_layer_cap=1.0)
    for name, lp in plan.layers.items():
        if lp.form == "dense":
            continue
        s = scores[name]
        dropped_in = set(range(s.inputs.numel())) - set(lp.keep_in.tolist())
        for i in dropped_in:
            assert s.inputs[i] <= plan.threshold
        assert lp.keep_in.numel() >= 1 and lp.keep_out.numel() >= 1
    assert plan.total_directions == total
    capped = plan_pruning(rotated, scores, ratio=0.9, per_layer_cap=0.5)
    for name, lp in capped.layers.items():
        assert lp.keep_in.numel() >= scores[name].inputs.numel() // 2
        assert lp.keep_out.numel() >= scores[name].outputs.numel() // 2
    with pytest.raises(ConfigError):
        plan_pruning(rotated, scores, ratio=1.0)


def test_pruned_model_equals_its_plan_and_is_smaller():
    model = net().eval()
    loader = data()
    kfe = kfe_of(model, loader)
    rotated = rotated_layers(model, kfe)
    scores = {n: direction_scores(rotated[n], kfe[n]) for n in kfe}
    plan = plan_pruning(rotated, scores, ratio=0.6)
    pruned = apply_plan(copy.deepcopy(model), rotated, plan).eval()
    # Reference: zero the pruned directions inside the full (unpruned) bottlenecks.
    masked = to_eigenbasis(model, kfe).eval()
    for name, lp in plan.layers.items():
        if lp.form == "dense":
            continue
        core = masked.get_submodule(name).core
        keep_out = torch.zeros(core.weight.shape[0], dtype=torch.bool)
        keep_out[lp.keep_out] = True
        keep_in = torch.zeros(core.weight.shape[1], dtype=torch.bool)
        keep_in[lp.keep_in] = True
        with torch.no_grad():
            core.weight[~keep_out] = 0
            core.weight[:, ~keep_in] = 0
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-4)
    assert count(pruned, (1, 3, 8, 8)).params < count(model, (1, 3, 8, 8)).params


def test_iterative_rounds_merge_bases_instead_of_stacking():
    model = net()
    result = run_pruning(model, data(), ratio=0.3, rounds=3, input_shape=(1, 3, 8, 8))
    for module in result.model.modules():
        if isinstance(module, KFEBottleneck):
            assert not any(isinstance(c, KFEBottleneck) for c in module.children())
            assert isinstance(module.core, (nn.Conv2d, nn.Linear))
    assert result.after.params < result.before.params
    assert [r.round for r in result.rounds] == [1, 2, 3]
    # the classifier is excluded by default
    assert isinstance(result.model[11], nn.Linear)
    assert result.model[11].weight.shape == (5, 16)


def test_a_rotation_round_without_pruning_is_exact_for_bottlenecks():
    """Merging a new eigenbasis into an existing bottleneck (Q <- Q_prev Q_new) is exact."""
    model = net().eval()
    loader = data()
    first = run_pruning(model, loader, ratio=0.5, input_shape=(1, 3, 8, 8)).model.eval()
    kfe = kfe_of(first, loader)
    again = to_eigenbasis(first, kfe).eval()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(again(x), first(x), atol=1e-5, rtol=1e-4)
    assert not any(
        isinstance(c, KFEBottleneck)
        for m in again.modules()
        if isinstance(m, KFEBottleneck)
        for c in m.children()
    )


def test_target_params_is_reached_within_one_percent():
    model = net(w=4)
    result = run_pruning(model, data(), target_params=0.5, input_shape=(1, 3, 8, 8))
    assert abs(result.after.params / result.before.params - 0.5) <= 0.01 * 0.5 + 1e-9
    with pytest.raises(ConfigError, match="unreachable"):
        run_pruning(model, data(), target_params=0.001, input_shape=(1, 3, 8, 8))


def test_budget_arguments_are_validated():
    model = net()
    with pytest.raises(ConfigError, match="exactly one"):
        run_pruning(model, data(), ratio=0.5, target_params=0.5)
    with pytest.raises(ConfigError, match="method"):
        run_pruning(model, data(), method="eigendamge", ratio=0.5)
