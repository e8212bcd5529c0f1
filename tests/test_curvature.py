"""K-FAC against independent references: exact Fisher blocks from torch.func, explicit
unfolding, closed forms, and the promise not to disturb the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from eigendamage.curvature import batched_eigh, collect_kfac, eigendecompose
from eigendamage.errors import ConfigError, CurvatureError, ModelError


@pytest.fixture(autouse=True)
def float64_by_default():
    """Exactness checks in double precision, without leaking into other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def loader_of(x, y, batch_size=None):
    batch_size = batch_size or len(x)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def per_example_grads(model, x, y):
    """Per-example gradients of the per-example loss w.r.t. every parameter (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def weight_with_bias(grads, prefix):
    """Per-example [W | b] (N, out, in(+1)); its row-major flattening is the order in which
    the Fisher block is kron(S, A)."""
    w = grads[f"{prefix}.weight"].flatten(2)
    b = grads.get(f"{prefix}.bias")
    return torch.cat([w, b.unsqueeze(-1)], -1) if b is not None else w


def exact_fisher_block(model, x, y, prefix):
    g = per_example_grads(model, x, y)
    gw = weight_with_bias(g, prefix).flatten(1)  # (N, params of the layer)
    return gw.T @ gw / len(x)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_linear_layers_single_example_equal_exact_fisher():
    """With one example K-FAC is exact for every Linear layer of a deep net."""
    model = mlp()
    x, y = torch.randn(1, 5), torch.tensor([2])
    factors = collect_kfac(model, loader_of(x, y), fisher="empirical", dtype=torch.float64)
    for name in ("0", "2"):
        exact = exact_fisher_block(model, x, y, name)
        kfac = torch.kron(factors[name].S, factors[name].A)
        torch.testing.assert_close(kfac, exact, atol=1e-10, rtol=1e-8)


def test_true_fisher_matches_exact_expectation_over_labels():
    """True Fisher with many label draws -> the exact E_y over the model's distribution."""
    model = nn.Sequential(nn.Linear(4, 3))
    torch.manual_seed(1)
    x = torch.randn(1, 4)
    probs = torch.softmax(model(x), -1)[0].detach()
    exact = sum(
        p * exact_fisher_block(model, x, torch.tensor([c]), "0") for c, p in enumerate(probs)
    )
    factors = collect_kfac(
        model, loader_of(x, torch.tensor([0])), samples=4000, seed=3, dtype=torch.float64
    )
    kfac = torch.kron(factors["0"].S, factors["0"].A)
    assert (kfac - exact).abs().max() < 0.05 * exact.abs().max()
    # and the closed form of the logit-layer S: diag(p) - p p^T
    torch.testing.assert_close(
        factors["0"].S, torch.diag(probs) - torch.outer(probs, probs), atol=0.03, rtol=0
    )


def test_true_fisher_is_seeded():
    model = mlp()
    x = torch.randn(8, 5)
    data = loader_of(x, torch.zeros(8, dtype=torch.long))
    a = collect_kfac(model, data, seed=5)["2"].S
    b = collect_kfac(model, data, seed=5)["2"].S
    c = collect_kfac(model, data, seed=6)["2"].S
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def small_cnn(groups=1, stride=2, dilation=2, padding=1, padding_mode="zeros"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(
            4,
            6,
            3,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        ),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=groups, bias=False),
        nn.Flatten(),
        nn.LazyLinear(3),
    )


def explicit_conv_factors(model, x, y, layer_index):
    """A (patch and channel) and S of one conv computed by explicit unfolding + autograd."""
    conv = model[layer_index]
    h = x
    for m in model[:layer_index]:
        h = m(h)
    out = conv(h)
    out_leaf = out.detach().requires_grad_()
    rest = out_leaf
    for m in model[layer_index + 1 :]:
        rest = m(rest)
    loss = F.cross_entropy(rest, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, out_leaf)
    n, c = h.shape[:2]
    g_ = conv.groups
    pad = conv.padding
    hp = F.pad(
        h,
        (pad[1], pad[1], pad[0], pad[0]),
        mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode,
    )
    cols = F.unfold(hp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    t = cols.shape[-1]
    k = conv.kernel_size[0] * conv.kernel_size[1]
    a_patch, a_chan, s = [], [], []
    for gi in range(g_):
        cg = c // g_
        u = cols.view(n, c, k, t)[:, gi * cg : (gi + 1) * cg]  # (n, cg, k, t)
        up = u.reshape(n, cg * k, t).permute(0, 2, 1).reshape(-1, cg * k)
        if conv.bias is not None:
            up = torch.cat([up, torch.ones(len(up), 1)], 1)
        a_patch.append(up.T @ up / (n * t))
        uc = u.permute(0, 2, 3, 1).reshape(-1, cg)
        a_chan.append(uc.T @ uc / (n * t * k))
        og = conv.out_channels // g_
        gg = g[:, gi * og : (gi + 1) * og].permute(0, 2, 3, 1).reshape(-1, og)
        s.append(gg.T @ gg / n)
    pick = (lambda lst: lst[0]) if g_ == 1 else torch.stack
    return pick(a_patch), pick(a_chan), pick(s)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_factors_equal_explicit_unfolding(groups, padding_mode):
    model = small_cnn(groups=groups, padding_mode=padding_mode)
    x, y = torch.randn(3, 4, 9, 9), torch.tensor([0, 2, 1])
    model(x)  # materialise the lazy layer
    patch = collect_kfac(model, loader_of(x, y), fisher="empirical", dtype=torch.float64)
    chan = collect_kfac(
        model, loader_of(x, y), fisher="empirical", conv_mode="channel", dtype=torch.float64
    )
    for idx in (0, 2):
        a_patch, a_chan, s = explicit_conv_factors(model, x, y, idx)
        torch.testing.assert_close(patch[str(idx)].A, a_patch)
        torch.testing.assert_close(patch[str(idx)].S, s)
        torch.testing.assert_close(chan[str(idx)].A, a_chan)
        torch.testing.assert_close(chan[str(idx)].S, s)
        assert patch[str(idx)].groups == groups


def test_factors_stream_over_batches():
    """Summing over batches equals one big batch (streaming, no stored activations)."""
    model = small_cnn()
    x, y = torch.randn(6, 4, 9, 9), torch.tensor([0, 2, 1, 1, 0, 2])
    model(x)
    one = collect_kfac(model, loader_of(x, y), fisher="empirical", dtype=torch.float64)
    many = collect_kfac(model, loader_of(x, y, 2), fisher="empirical", dtype=torch.float64)
    for k in one:
        torch.testing.assert_close(one[k].A, many[k].A)
        torch.testing.assert_close(one[k].S, many[k].S)


def test_one_by_one_conv_on_one_pixel_equals_linear():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    conv = nn.Conv2d(5, 3, 1)
    conv.weight.data = lin.weight.data.view(3, 5, 1, 1).clone()
    conv.bias.data = lin.bias.data.clone()
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    f_lin = collect_kfac(nn.Sequential(lin), loader_of(x, y), seed=1)["0"]
    conv_model = nn.Sequential(conv, nn.Flatten())
    f_conv = collect_kfac(conv_model, loader_of(x.view(4, 5, 1, 1), y), seed=1)["0"]
    torch.testing.assert_close(f_lin.A, f_conv.A)
    torch.testing.assert_close(f_lin.S, f_conv.S)


def test_diagonal_fisher_equals_per_example_gradients():
    model = small_cnn(groups=2)
    x, y = torch.randn(3, 4, 9, 9), torch.tensor([0, 2, 1])
    model(x)
    factors = collect_kfac(
        model, loader_of(x, y), fisher="empirical", diag=True, dtype=torch.float64
    )
    g = per_example_grads(model, x, y)
    for name in ("0", "2", "4"):
        w = g[f"{name}.weight"].flatten(2)
        b = g.get(f"{name}.bias")
        if b is not None:
            w = torch.cat([w, b.unsqueeze(-1)], -1)
        torch.testing.assert_close(factors[name].extra["diag"], w.square().mean(0))


def test_model_state_untouched():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)
    )
    model.train()
    model[4].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    bn_before = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    params_before = [p.clone() for p in model.parameters()]
    x, y = torch.randn(5, 2, 4, 4), torch.tensor([0, 1, 0, 1, 1])
    collect_kfac(model, loader_of(x, y))
    assert model.training and all(m.training for m in model.modules())
    assert not model[4].weight.requires_grad and model[4].bias.requires_grad
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[0].bias.grad is None
    assert torch.equal(model[1].running_mean, bn_before[0])
    assert torch.equal(model[1].num_batches_tracked, bn_before[1])
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True))


def test_frozen_model_still_gets_factors():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 5)
    f = collect_kfac(model, loader_of(x, torch.zeros(4, dtype=torch.long)))
    assert f["0"].S.abs().sum() > 0


def test_eigendecomposition_reconstructs_and_batches():
    model = small_cnn()
    x, y = torch.randn(3, 4, 9, 9), torch.tensor([0, 2, 1])
    model(x)
    factors = collect_kfac(model, loader_of(x, y), dtype=torch.float64)
    kfe = eigendecompose(factors)
    for name, f in factors.items():
        e = kfe[name]
        torch.testing.assert_close(e.A.Q @ torch.diag(e.A.lam) @ e.A.Q.T, f.A, atol=1e-8, rtol=0)
        torch.testing.assert_close(e.S.Q @ torch.diag(e.S.lam) @ e.S.Q.T, f.S, atol=1e-8, rtol=0)
        assert (e.A.lam >= 0).all()
        torch.testing.assert_close(e.diag, torch.outer(e.S.lam, e.A.lam))
    mats = [f.A for f in factors.values()] + [f.S for f in factors.values()]
    batched = batched_eigh(mats, batched=True)
    seq = batched_eigh(mats, batched=False)
    for (l1, _), (l2, _) in zip(batched, seq, strict=True):
        torch.testing.assert_close(l1, l2)


def test_damping_is_relative():
    model = mlp()
    x = torch.randn(8, 5)
    factors = collect_kfac(model, loader_of(x, torch.zeros(8, dtype=torch.long)))
    plain = eigendecompose(factors)["0"].A.lam
    damped = eigendecompose(factors, damping=0.1)["0"].A.lam
    torch.testing.assert_close(damped, plain + 0.1 * plain.mean())


def test_errors_are_specific():
    model = mlp()
    x, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="fisher"):
        collect_kfac(model, loader_of(x, y), fisher="typo")
    with pytest.raises(ModelError, match="no nn.Linear"):
        collect_kfac(nn.Sequential(nn.ReLU()), loader_of(x, y))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CurvatureError, match="non-finite loss"):
        collect_kfac(model, loader_of(bad, y))
    with pytest.raises(CurvatureError, match="no batches"):
        collect_kfac(model, [])
    with pytest.raises(ModelError, match="not a submodule"):
        collect_kfac(model, loader_of(x, y), modules=["nope"])


def test_label_draws_share_one_accumulation_of_a():
    """A depends on the inputs only: several label draws must not re-accumulate (or rescale) it."""
    model = small_cnn()
    x = torch.randn(6, 4, 9, 9)
    model(x)
    data = loader_of(x, torch.zeros(6, dtype=torch.long), 3)
    one = collect_kfac(model, data, samples=1, seed=2)
    three = collect_kfac(model, data, samples=3, seed=2)
    for name in one:
        assert torch.equal(one[name].A, three[name].A)
        assert one[name].a_count == three[name].a_count
        assert three[name].num_examples == 3 * one[name].num_examples


def test_label_draws_of_a_batch_do_not_depend_on_other_batches():
    """Per-batch seeding: a rank that skips batches draws exactly what one process draws."""
    from eigendamage.curvature.hooks import iterate_layer_calls, resolve_targets

    model = mlp()
    x = torch.randn(8, 5)
    data = loader_of(x, torch.zeros(8, dtype=torch.long), 2)
    targets = resolve_targets(model, None)
    full = [calls["2"][0] for _, calls in iterate_layer_calls(model, data, targets, seed=4)]
    odd = [
        calls["2"][0]
        for _, calls in iterate_layer_calls(model, data, targets, seed=4, shard=(1, 2))
    ]
    assert [c.batch for c in odd] == [1, 3]
    for call in odd:
        assert torch.equal(call.grad_output, full[call.batch].grad_output)


@pytest.mark.parametrize("conv_mode", ["patch", "channel"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_max_dense_keeps_exactly_the_diagonal(conv_mode, padding_mode):
    model = small_cnn(groups=2, padding_mode=padding_mode)
    x, y = torch.randn(3, 4, 9, 9), torch.tensor([0, 2, 1])
    model(x)
    data = loader_of(x, y)
    dense = collect_kfac(model, data, fisher="empirical", conv_mode=conv_mode)
    small = collect_kfac(model, data, fisher="empirical", conv_mode=conv_mode, max_dense=1)
    for name, f in dense.items():
        g = small[name]
        assert g.a_diagonal and g.A.shape == f.A.shape[:-1]
        torch.testing.assert_close(g.A, torch.diagonal(f.A, dim1=-2, dim2=-1))
        torch.testing.assert_close(g.dense_A(), torch.diag_embed(g.A))
        torch.testing.assert_close(g.S, f.S)
        assert g.a_count == f.a_count
        if f.has_bias:
            torch.testing.assert_close(g.A_no_bias, torch.diagonal(f.A_no_bias, dim1=-2, dim2=-1))


def test_eigendecomposition_of_a_diagonal_factor_is_exact():
    model = mlp()
    x = torch.randn(8, 5)
    data = loader_of(x, torch.zeros(8, dtype=torch.long))
    factors = collect_kfac(model, data, max_dense=5)  # "0" (5 inputs + bias) goes diagonal
    assert factors["0"].a_diagonal and not factors["2"].a_diagonal
    e = eigendecompose(factors, drop_bias=True)["0"].A
    assert (e.lam[1:] >= e.lam[:-1]).all()
    torch.testing.assert_close(e.Q @ torch.diag(e.lam) @ e.Q.T, torch.diag(factors["0"].A[:-1]))


def test_float32_policy_and_parallel_workers_match_the_float64_loop():
    """fp32 for big float32 factors stays within float32 accuracy; float64 input is untouched;
    worker threads give the sequential loop's results (to float64 round-off; eigenvectors up
    to sign, and LAPACK's rounding depends on the thread count)."""
    torch.manual_seed(0)
    mats = []
    for d in (40, 40, 70, 9):
        z = torch.randn(d, 3 * d)
        mats.append(z @ z.T / (3 * d))
    ref = batched_eigh(mats, batched=False)
    for (lam, q), (lam_ref, _), m in zip(
        batched_eigh([m.float() for m in mats], fp32_above=30, workers=2), ref, mats, strict=True
    ):
        assert lam.dtype == q.dtype == torch.float32
        scale = lam_ref.max()
        assert (lam.double() - lam_ref).abs().max() < 1e-5 * scale
        assert ((q.double() * lam.double()) @ q.double().T - m).abs().max() < 1e-5 * scale
    for (lam, q), (lam_ref, q_ref) in zip(
        batched_eigh(mats, fp32_above=30, workers=2), ref, strict=True
    ):
        torch.testing.assert_close(lam, lam_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q.abs(), q_ref.abs(), rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=2, padding="same", dilation=2),  # asymmetric 'same' padding
        dict(kernel_size=3, padding=2, stride=2, padding_mode="circular"),
        dict(kernel_size=1),  # every pixel covered once: no weighting
        dict(kernel_size=1, stride=2),  # 3 in 4 pixels never read: sliced away
        dict(kernel_size=2, stride=3, padding=1),  # unread pixels not evenly spaced
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_a_is_the_offset_average_of_the_patch_a(conv, channels_last):
    """Channel-mode A (coverage-weighted, never unfolded) = mean over kernel offsets of the
    patch-mode A's diagonal offset blocks, whatever the padding and memory layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 5, bias=False, **conv), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(3, 4, 7, 7), torch.tensor([0, 2, 1])
    model(x)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    data = loader_of(x, y)
    patch = collect_kfac(model, data, fisher="empirical")["0"]
    chan = collect_kfac(model, data, fisher="empirical", conv_mode="channel")["0"]
    k = model[0].kernel_size[0] * model[0].kernel_size[1]
    blocks = patch.A.view(4, k, 4, k).diagonal(dim1=1, dim2=3)  # (c, c', offset)
    torch.testing.assert_close(chan.A, blocks.mean(-1))
    torch.testing.assert_close(chan.S, patch.S)


def test_float32_eigh_that_fails_is_redone_in_float64(monkeypatch):
    torch.manual_seed(0)
    z = torch.randn(40, 80)
    mats = [(z @ z.T / 80).float()]
    real_eigh = torch.linalg.eigh

    def fp32_fails(m):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", fp32_fails)
    ((lam, q),) = batched_eigh(mats, fp32_above=10, workers=1)
    ((lam_ref, q_ref),) = batched_eigh(mats, workers=1)
    assert torch.equal(lam, lam_ref) and torch.equal(q, q_ref)
    with pytest.raises(CurvatureError, match="raise the damping"):
        batched_eigh(mats, dtype=torch.float32, workers=1)


class _PadsInside(nn.Conv2d):
    """Like timm's Conv2dSame: pads in its own forward, so the hook's input is not what the
    convolution reads."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_layers_with_their_own_forward_are_left_out_or_refused():
    torch.manual_seed(0)
    model = nn.Sequential(_PadsInside(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = [(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))]
    assert set(collect_kfac(model, data)) == {"3"}  # the padding conv is not a plain layer
    with pytest.raises(ModelError, match="its own forward"):
        collect_kfac(model, data, modules=["0"])


def test_linear_on_channels_last_maps_reads_features_last():
    # ConvNeXt/Swin apply nn.Linear to (N, H, W, C): its factors are those of the same layer
    # on (N, H*W, C) tokens, not a conv-layout reading of the 4-D gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(2, 4, 5, 3), torch.randint(0, 2, (2, 4, 5))
    maps = collect_kfac(model, [(x, y)], fisher="empirical", diag=True)["0"]
    tokens = collect_kfac(
        model, [(x.reshape(2, 20, 3), y.reshape(2, 20))], fisher="empirical", diag=True
    )["0"]
    for field in ("A", "S"):
        torch.testing.assert_close(getattr(maps, field), getattr(tokens, field))
    torch.testing.assert_close(maps.extra["diag"], tokens.extra["diag"])


def wide_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 40, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(40, 48, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(48, 64),
        nn.Tanh(),
        nn.Linear(64, 50),
    )


@pytest.mark.parametrize("conv_mode", ["patch", "channel"])
def test_rank_bounds_count_the_vectors_summed_and_bound_the_rank(conv_mode):
    model = wide_net()
    x, y = torch.randn(3, 3, 2, 2), torch.tensor([0, 2, 1])
    factors = collect_kfac(model, loader_of(x, y, 2), conv_mode=conv_mode, samples=2)
    pixels = 3 * 2 * 2  # examples x locations, over both batches
    expect = {"0": (pixels, 2 * pixels), "2": (pixels, 2 * pixels), "6": (3, 6), "8": (3, 6)}
    for name, (a_rows, s_rows) in expect.items():
        f = factors[name]
        assert (f.a_rank_bound, f.s_rank_bound) == (a_rows, s_rows)
        assert torch.linalg.matrix_rank(f.A) <= a_rows
        assert torch.linalg.matrix_rank(f.S) <= s_rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_eigh_is_an_exact_eigendecomposition(dtype):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 7, 60, generator=g, dtype=dtype) * torch.logspace(0, -2, 60, dtype=dtype)
    m = rows.mT @ rows  # (2, 60, 60), rank 7 each
    ((lam, q),) = batched_eigh([m], fp32_above=0, rank_bounds=[7])
    ((ref, _),) = batched_eigh([m.double()], batched=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float(ref.max())
    assert (lam[..., 1:] >= lam[..., :-1]).all()
    assert (lam[..., :-15] == 0).all() and (lam[..., :-7] <= tol * scale).all()  # null space
    eye = torch.eye(60, dtype=dtype).expand(2, 60, 60)
    torch.testing.assert_close(q.mT @ q, eye, atol=10 * tol, rtol=0)
    torch.testing.assert_close((q * lam.unsqueeze(-2)) @ q.mT, m, atol=tol * scale, rtol=0)
    torch.testing.assert_close(lam.double(), ref, atol=tol * scale, rtol=0)


def test_a_wrong_rank_bound_falls_back_to_the_full_eigh():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(80, 40, generator=g)
    m = rows.T @ rows  # full rank 40, claimed 5
    ((lam, q),) = batched_eigh([m], rank_bounds=[5])
    ((ref, _),) = batched_eigh([m], batched=False)
    torch.testing.assert_close(lam, ref)
    torch.testing.assert_close(q @ torch.diag(lam) @ q.T, m, atol=1e-9, rtol=0)


def test_eigendecompose_uses_rank_bounds_without_changing_the_factors_it_describes():
    """Factors from 3 examples of a 64/50-wide classifier: low rank, decomposed exactly."""
    model = wide_net()
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 2, 1])
    factors = collect_kfac(model, loader_of(x, y), conv_mode="channel", dtype=torch.float64)
    kfe = eigendecompose(factors, drop_bias=True)
    for name, f in factors.items():
        e = kfe[name]
        for eig, m in ((e.A, f.A_no_bias), (e.S, f.S)):
            scale = float(eig.lam.max())
            torch.testing.assert_close(eig.Q.T @ eig.Q, torch.eye(len(m)), atol=1e-10, rtol=0)
            torch.testing.assert_close(
                eig.Q @ torch.diag(eig.lam) @ eig.Q.T, m, atol=1e-10 * scale, rtol=0
            )
    lam = kfe["8"].S.lam  # rank 3 of 50: a null space of exact zeros (and round-off)
    assert (lam[:-11] == 0).all() and (lam[:-3] <= 1e-12 * lam.max()).all()
