"""Counting and latency: hand-computed MACs/params, side-effect freedom, latency sanity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eigendamage.errors import ConfigError, ModelError
from eigendamage.measure import Counts, count, measure_latency, reduction
from eigendamage.models import create_model


def test_tiny_conv_linear_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    c = count(model, (1, 3, 6, 6))
    assert c.params == (3 * 8 * 9 + 8) + 2 * 8 + (8 * 5 + 5)
    conv_macs = 8 * 6 * 6 * 3 * 9
    assert c.flops == conv_macs + 8 * 5
    assert c.per_layer["0"] == (224, conv_macs)
    assert c.per_layer["1"] == (16, 0)  # BN: params, no FLOPs
    assert c.per_layer["5"] == (45, 40)
    assert "2" not in c.per_layer  # nothing to report for ReLU
    assert count(model, (2, 3, 6, 6)).flops == 2 * c.flops  # totals are for the whole input


def test_grouped_strided_conv():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
    # output 8 x 5 x 5, each output sums (4 / 2) * 3 * 3 products
    assert count(conv, (1, 4, 9, 9)).flops == 8 * 5 * 5 * 2 * 9
    depthwise = nn.Conv1d(6, 6, 5, groups=6)
    assert count(depthwise, (1, 6, 20)).flops == 6 * 16 * 5


def test_transposed_conv():
    deconv = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
    # every input element meets (6 / 2) * 2 * 2 weights; equals 600 outputs * 2 products
    assert count(deconv, (1, 4, 5, 5)).flops == 4 * 25 * 3 * 4 == 6 * 10 * 10 * 2


def test_linear_on_nd_input_and_attention():
    assert count(nn.Linear(10, 5), (2, 3, 10)).flops == 2 * 3 * 5 * 10
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 4, 8)
    c = count(attn, example_inputs=(x, x, x))
    assert c.flops == 4 * (3 * 8 * 8 + 8 * 8)  # q, k, v and output projections
    assert c.params == 4 * 8 * 8 + 4 * 8


def test_shared_modules_and_parameters():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied weight

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    c = count(Shared(), (1, 4))
    assert c.params == 16 + 4 + 4  # shared weight once
    assert c.flops == 3 * 16
    assert c.per_layer["a"] == (20, 32)  # called twice


def test_known_totals():
    vgg = count(create_model("vgg19"))
    assert vgg.params == 20_035_018
    assert vgg.flops == 398_136_320  # the usual "398M FLOPs" of CIFAR VGG19
    assert count(create_model("resnet56")).flops == 125_747_840  # the usual "125M"
    digits = count(create_model("digits-vgg"))  # default shape from the spec: 1x1x8x8
    assert digits.flops == 2_379_008


def test_count_restores_modes_and_removes_hooks():
    model = create_model("digits-resnet")
    model.train()
    model.layer1[0].eval()
    before = {n: m.training for n, m in model.named_modules()}
    bn = model.bn1
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())

    count(model, (2, 1, 8, 8))
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())

    with pytest.raises(ModelError, match="input shape"):
        count(model, (1, 3, 8, 8))  # wrong channel count
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not m._forward_hooks for m in model.modules())


def test_count_argument_errors():
    with pytest.raises(ConfigError):
        count(nn.Linear(2, 2), (0, 2))
    with pytest.raises(ConfigError):
        count(nn.Linear(2, 2), (1, 2), example_inputs=torch.zeros(1, 2))


def test_reduction():
    before = Counts(params=1000, flops=400)
    after = Counts(params=250, flops=300)
    assert reduction(before, after) == pytest.approx({"params": 0.75, "flops": 0.25})
    assert reduction(Counts(0, 0), Counts(0, 0)) == {"params": 0.0, "flops": 0.0}


def test_latency_is_positive_and_side_effect_free():
    model = create_model("tiny-mlp").train()
    threads = torch.get_num_threads()
    r = measure_latency(model, (1, 1, 8, 8), batch_size=3, threads=1, warmup=1, repeats=7)
    assert r.repeats == 7 and r.batch_size == 3 and r.device == "cpu" and r.threads == 1
    for v in (r.median_ms, r.p90_ms, r.mean_ms):
        assert v > 0 and math.isfinite(v)
    assert r.p90_ms >= r.median_ms
    assert model.training
    assert torch.get_num_threads() == threads
    with pytest.raises(ConfigError):
        measure_latency(model, (1, 1, 8, 8), repeats=0)
