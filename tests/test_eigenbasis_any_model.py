"""`collect_kfac -> eigendecompose -> to_eigenbasis` with the defaults, on any model.

The contract: the rewritten model computes the same function (before pruning); patch-mode
and bias-coordinate factors (the defaults) are expressed exactly, and layers that cannot
be rewritten (grouped/depthwise convs, other types) are left as they are and listed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigendamage import collect_kfac, eigendecompose, to_eigenbasis
from eigendamage.errors import CurvatureError, ModelError
from eigendamage.surgery.eigenbasis import KFEBottleneck, to_factored
from eigendamage.surgery.fold import fold_for_speed

torchvision = pytest.importorskip("torchvision")

FAST = [
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
    "mobilenet_v3_small",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_x_400mf",
    "mnasnet0_5",
    "googlenet",
]
SLOW = ["resnet18", "resnet50", "densenet121"]  # 15-40 s each on two cores
KWARGS = {"googlenet": {"init_weights": False}}  # (silences a FutureWarning)
F64 = torch.float64
SIZE = {"squeezenet1_0": 64, "googlenet": 64}


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of ``x``: an untrained network in eval mode otherwise shrinks
    its activations towards 1e-14, where any rewrite's round-off looks relative-large."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _grouped(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_default_chain_is_exact_on_torchvision_classifiers(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, **KWARGS.get(name, {})).double()
    size = SIZE.get(name, 32)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    model = _calibrated(model, x)
    loader = [(x[:2], torch.randint(0, 10, (2,)))]
    kfe = eigendecompose(collect_kfac(model, loader, dtype=torch.float64))
    rotated, skipped = to_eigenbasis(model, kfe, return_skipped=True)
    with torch.no_grad():
        expected, got = model(x), rotated.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())
    assert set(skipped) == _grouped(model) & set(kfe)
    assert all(reason.startswith("grouped conv") for reason in skipped.values())
    bottlenecks = sum(isinstance(m, KFEBottleneck) for m in rotated.modules())
    assert bottlenecks == len(kfe) - len(skipped) > 0
    assert not any(isinstance(m, KFEBottleneck) for m in model.modules())


def test_float32_defaults_are_exact_to_float32_and_return_a_module():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    model = _calibrated(model, x)
    rotated = to_eigenbasis(model, eigendecompose(collect_kfac(model, [(x, None)])))
    assert isinstance(rotated, nn.Module)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(
            rotated(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max()
        )
    assert _grouped(rotated) == _grouped(model)  # depthwise convs left as they are


class _Mixed(nn.Module):
    """Every convention at once: biased k x k conv with stride and reflect padding, a
    bias-free conv, a biased 1x1 conv, a depthwise conv and a biased Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect")
        self.body = nn.Conv2d(6, 8, (3, 1), padding="same", bias=False)
        self.point = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.dw(torch.tanh(self.point(torch.relu(self.body(x)))))
        return self.fc(x.mean((-1, -2)))


def _mixed_case():
    torch.manual_seed(0)
    model = _Mixed().double().eval()
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    return model, x, [(x, torch.randint(0, 5, (6,)))]


@pytest.mark.parametrize(
    ("conv_mode", "drop_bias"), [("patch", False), ("patch", True), ("channel", True)]
)
def test_every_factor_convention_is_rewritten_exactly(conv_mode, drop_bias):
    model, x, loader = _mixed_case()
    factors = collect_kfac(model, loader, conv_mode=conv_mode, dtype=torch.float64)
    rotated, skipped = to_eigenbasis(
        model, eigendecompose(factors, drop_bias=drop_bias), return_skipped=True
    )
    assert skipped == {"dw": "grouped conv (groups=8)"}
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), model(x), rtol=1e-10, atol=1e-12)
    assert isinstance(rotated.dw, nn.Conv2d) and rotated.dw.groups == 8
    rot_in = rotated.stem.rot_in
    assert rot_in.kernel_size == ((3, 3) if conv_mode == "patch" else (1, 1))
    assert (rot_in.bias is not None) == (conv_mode == "patch" and not drop_bias)


def test_a_patch_mode_bottleneck_is_final_and_says_how_to_prune():
    model, x, loader = _mixed_case()
    rotated = to_eigenbasis(model, eigendecompose(collect_kfac(model, loader)))
    with pytest.raises(ModelError, match="conv_mode='channel'.*drop_bias=True"):
        to_factored(rotated.stem)
    folded, forms = fold_for_speed(rotated, x[:1], repeats=1)
    assert forms == {} and isinstance(folded.stem, KFEBottleneck)
    again, skipped = to_eigenbasis(
        rotated, eigendecompose(collect_kfac(model, loader)), return_skipped=True
    )
    assert set(skipped) == {"stem", "body", "point", "fc", "dw"}


def test_default_factors_of_a_pruned_model_name_the_options_pruning_needs():
    model, x, loader = _mixed_case()
    channel = eigendecompose(
        collect_kfac(model, loader, conv_mode="channel", dtype=F64), drop_bias=True
    )
    rotated = to_eigenbasis(model, channel)
    factors = collect_kfac(rotated, loader)  # defaults: rotations and cores alike
    assert {"stem.rot_in", "stem.core", "stem.rot_out"} <= set(factors)
    with pytest.raises(ModelError, match="conv_mode='channel'.*drop_bias=True"):
        to_eigenbasis(rotated, eigendecompose(factors))
    cores = [n for n in factors if n.endswith(".core") or n == "dw"]
    again, skipped = to_eigenbasis(
        rotated,
        eigendecompose(
            collect_kfac(rotated, loader, conv_mode="channel", dtype=F64), drop_bias=True
        ),
        return_skipped=True,
    )
    assert set(factors) - set(cores) == set(skipped) - {"dw"}
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-10, atol=1e-12)


def test_factors_of_another_model_or_layer_are_refused_by_name():
    model, _, loader = _mixed_case()
    kfe = eigendecompose(collect_kfac(model, loader))
    kfe["body"] = kfe["point"]
    with pytest.raises(ModelError, match="'body'.*patch mode"):
        to_eigenbasis(model, kfe)
    with pytest.raises(ModelError, match="'nowhere'"):
        to_eigenbasis(model, {"nowhere": kfe["fc"]})


class _WithAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 3)  # called in training mode only, like GoogLeNet's
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h) + (self.aux(h) if self.training else 0)


def test_default_targets_leave_out_layers_never_called():
    model = _WithAux().eval()
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    assert set(collect_kfac(model, loader)) == {"body", "head"}
    with pytest.raises(CurvatureError, match="'aux' was never called"):
        collect_kfac(model, loader, modules=["body", "aux"])


def test_vision_transformer_default_chain_is_exact():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    vit = vit.double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    factors = collect_kfac(vit, [(x, None)], dtype=torch.float64)
    assert not any("out_proj" in n for n in factors)  # used functionally: never called
    rotated = to_eigenbasis(vit, eigendecompose(factors))
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), vit(x), rtol=1e-9, atol=1e-10)
