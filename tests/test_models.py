"""Model zoo: shapes, parameter totals, registry behaviour and error messages."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eigendamage.errors import ModelError
from eigendamage.models import (
    VGG,
    DigitsResNet,
    DigitsVGG,
    ResNet,
    TinyMLP,
    create_from_spec,
    create_model,
    default_input_shape,
    list_models,
)
from eigendamage.models.cifar_vgg import CFGS

CIFAR = ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "resnet32-wide"]
DIGITS = ["digits-vgg", "digits-resnet", "tiny-mlp"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_has_the_documented_names():
    names = list_models()
    assert names == sorted(names)
    assert set(CIFAR + DIGITS) <= set(names)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models_output_shape(name):
    model = create_model(name, num_classes=7).eval()
    batch = 2 if name == "resnet32-wide" else 1
    with torch.no_grad():
        assert model(torch.randn(batch, 3, 32, 32)).shape == (batch, 7)


@pytest.mark.parametrize("name", DIGITS)
def test_digits_models_output_shape_and_backward(name):
    model = create_model(name)
    assert model.eigendamage_spec["kwargs"]["in_channels"] == 1  # digits default
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    seen = []
    # full backward hooks fail on in-place ops: K-FAC relies on these working
    handles = [
        m.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)
    ]
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert len(seen) == len(handles)
    for h in handles:
        h.remove()


def test_vgg_any_input_size_and_attributes():
    model = VGG(11, num_classes=5, in_channels=2).eval()
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == 512
    with torch.no_grad():
        assert model(torch.randn(1, 2, 48, 40)).shape == (1, 5)


def test_vgg19_param_count_matches_hand_computation():
    total, c_in = 0, 3
    for c in CFGS[19]:
        if c != "M":
            total += c_in * c * 9 + 2 * c  # conv (no bias) + BN weight and bias
            c_in = c
    total += 512 * 10 + 10
    assert total == 20_035_018  # the paper's "20.04M"
    assert n_params(create_model("vgg19")) == total


def test_vgg_width_mult_and_init():
    model = VGG(16, width_mult=0.5)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs][:3] == [32, 32, 64]
    assert all(c.bias is None for c in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_resnet_structure_and_params():
    model = ResNet(20, widths=(16, 32, 64))
    blocks = [*model.layer1, *model.layer2, *model.layer3]
    assert len(blocks) == 9
    assert [b.downsample is None for b in blocks] == [True] * 3 + [False, True, True] * 2
    assert n_params(model) == 272_474  # the well-known 0.27M of ResNet-20
    assert n_params(create_model("resnet56")) == 855_770
    wide = create_model("resnet32-wide")
    assert wide.conv1.out_channels == 64 and wide.fc.in_features == 256


def test_small_models_sizes():
    vgg = DigitsVGG()
    assert n_params(vgg) > 250_000  # heavily over-parameterized for 64-pixel digits
    res = DigitsResNet()
    blocks = list(res.layer1)
    assert blocks[0].downsample is None and blocks[1].downsample is not None
    mlp = TinyMLP()
    assert n_params(mlp) == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert mlp(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_torchvision_model_without_weights():
    model = create_model("torchvision:resnet18", num_classes=1000)
    assert n_params(model) == 11_689_512
    assert model.eigendamage_spec["input_size"] == [3, 224, 224]
    small = create_model("torchvision:resnet18", in_channels=1).eval()
    assert small.conv1.in_channels == 1
    with torch.no_grad():
        assert small(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_timm_model_without_weights():
    pytest.importorskip("timm")
    model = create_model("timm:resnet10t", num_classes=3, in_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, 64, 64)).shape == (2, 3)
    assert model.eigendamage_spec["name"] == "timm:resnet10t"
    assert default_input_shape(model)[1] == 2


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("vgg91", "'vgg19'"),
        ("resnet23", "'resnet20'"),
        ("torchvision:resnt18", "'resnet18'"),
        ("timm:resnet10tt", "'resnet10t'"),
        ("tourchvision:resnet18", "'torchvision'"),
    ],
)
def test_unknown_names_suggest_close_matches(name, hint):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(ModelError, match="unknown") as err:
        create_model(name)
    assert hint in str(err.value)


def test_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="11, 13, 16, 19"):
        create_model("cifar-vgg", depth=12)
    with pytest.raises(ModelError, match="accepts: width_mult"):
        create_model("vgg19", depth=12)
    with pytest.raises(ModelError, match="6n\\+2"):
        create_model("cifar-resnet", depth=33)
    with pytest.raises(ModelError, match="width_mult"):
        create_model("vgg11", width_mult=0)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("digits-vgg", num_classes=0)
    with pytest.raises(ModelError, match="widths"):
        create_model("digits-resnet", widths=(8,))
    with pytest.raises(ModelError, match="without downloading"):
        create_model("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(ModelError):
        create_model("torchvision:resnet18", no_such_kwarg=1)


def test_spec_round_trips_through_json():
    model = create_model("digits-resnet", num_classes=4, widths=(8, 16))
    spec = json.loads(json.dumps(model.eigendamage_spec))
    assert spec == model.eigendamage_spec
    rebuilt = create_from_spec(spec)
    a, b = model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    with pytest.raises(ModelError):
        create_from_spec({"kwargs": {}})


def test_default_input_shape():
    assert default_input_shape("vgg19") == (1, 3, 32, 32)
    assert default_input_shape("digits-vgg", batch_size=4) == (4, 1, 8, 8)
    assert default_input_shape(create_model("tiny-mlp", image_size=4)) == (1, 1, 4, 4)
    assert default_input_shape(create_model("resnet20", in_channels=1)) == (1, 1, 32, 32)
    with pytest.raises(ModelError, match="input_shape"):
        default_input_shape(nn.Linear(2, 2))
