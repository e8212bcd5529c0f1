"""Property tests over random small architectures (Conv/Linear/BN/ReLU, residual adds with
identity or 1x1-conv shortcuts, random widths, kernels, strides, padding and biases):

* the Kronecker-factored eigenbasis reparameterisation computes the same function, and
* physically removing channels computes the same function as zeroing them (the reference
  the pruning scores reason about), for random kept-channel sets.

Models are float64, so "the same" is checked to 1e-9, far below any real difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from eigendamage.criteria.eigendamage import eigendamage_targets
from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.structure import ChannelGroups, mask_channels, prune_channels
from eigendamage.surgery.eigenbasis import KFEBottleneck, to_eigenbasis

TOL = {"rtol": 1e-9, "atol": 1e-9}
PROPERTY = settings(max_examples=25, deadline=None)


@dataclass(frozen=True)
class Block:
    residual: bool
    width: int
    kernel: int
    stride: int
    padding: int  # plain blocks only: residual blocks pad "same" so the add lines up
    bias: bool
    bn: bool


@dataclass(frozen=True)
class Arch:
    in_channels: int
    size: int
    blocks: tuple[Block, ...]
    flatten: bool  # Linear over the flattened map (else global average pooling first)
    hidden: int | None
    classes: int


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@st.composite
def architectures(draw: st.DrawFn) -> Arch:
    channels = in_channels = draw(st.integers(1, 3))
    size = start = draw(st.integers(3, 9))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        residual = draw(st.booleans())
        kernel = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 1, 2]))
        padding = kernel // 2 if residual else draw(st.integers(0, kernel // 2))
        # Same width often enough that identity shortcuts occur.
        width = channels if residual and draw(st.booleans()) else draw(st.integers(1, 6))
        size = _out_size(size, kernel, stride, padding)
        assume(size >= 1)
        blocks.append(Block(residual, width, kernel, stride, padding, *draw(st.tuples(
            st.booleans(), st.booleans()))))  # fmt: skip
        channels = width
    hidden = draw(st.one_of(st.none(), st.integers(1, 6)))
    return Arch(
        in_channels, start, tuple(blocks), draw(st.booleans()), hidden, draw(st.integers(2, 4))
    )


def _norm(width: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(width) if bn else nn.Identity()


class Residual(nn.Module):
    """conv-norm-relu-conv-norm plus an identity or 1x1-conv shortcut, then ReLU."""

    def __init__(self, cin: int, b: Block) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, b.width, b.kernel, b.stride, b.kernel // 2, bias=b.bias)
        self.bn1 = _norm(b.width, b.bn)
        self.conv2 = nn.Conv2d(b.width, b.width, 3, 1, 1, bias=b.bias)
        self.bn2 = _norm(b.width, b.bn)
        if cin == b.width and b.stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, b.width, 1, b.stride, bias=b.bias), _norm(b.width, b.bn)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


def build(arch: Arch, seed: int) -> nn.Module:
    """The network of ``arch`` in float64 and eval mode, with random BN statistics."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels, size = arch.in_channels, arch.size
    for b in arch.blocks:
        if b.residual:
            layers.append(Residual(channels, b))
        else:
            conv = nn.Conv2d(channels, b.width, b.kernel, b.stride, b.padding, bias=b.bias)
            layers += [conv, _norm(b.width, b.bn), nn.ReLU()]
        channels, size = b.width, _out_size(size, b.kernel, b.stride, b.padding)
    if arch.flatten:
        layers += [nn.Flatten()]
        features = channels * size * size
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = channels
    if arch.hidden is not None:
        layers += [nn.Linear(features, arch.hidden), nn.ReLU()]
        features = arch.hidden
    layers.append(nn.Linear(features, arch.classes))
    model = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _inputs(arch: Arch, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, arch.in_channels, arch.size, arch.size)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@PROPERTY
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_eigenbasis_reparameterisation_preserves_outputs(arch: Arch, seed: int) -> None:
    model = build(arch, seed)
    x = _inputs(arch, 12, seed)
    labels = torch.randint(arch.classes, (12,), generator=torch.Generator().manual_seed(seed))
    loader = [(x[:6], labels[:6]), (x[6:], labels[6:])]
    targets = eigendamage_targets(model, set())
    factors = collect_kfac(
        model, loader, conv_mode="channel", modules=targets, dtype=torch.float64, seed=seed
    )
    kfe = eigendecompose(factors, drop_bias=True)
    rotated = to_eigenbasis(model, kfe)
    bottlenecks = [m for m in rotated.modules() if isinstance(m, KFEBottleneck)]
    assert len(bottlenecks) == len(targets)
    with torch.no_grad():
        assert torch.allclose(rotated(x), model(x), **TOL)


@PROPERTY
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_channel_surgery_preserves_the_masked_function(arch: Arch, seed: int) -> None:
    model = build(arch, seed)
    x = _inputs(arch, 4, seed)
    groups = ChannelGroups.build(model, x[:1])
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        count = int(torch.randint(1, g.size + 1, (1,), generator=gen))
        keep[g.id] = torch.randperm(g.size, generator=gen)[:count].sort().values
    pruned = prune_channels(model, groups, keep)
    masked = mask_channels(model, groups, keep)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), **TOL)
    removed = sum(g.size - len(keep[g.id]) for g in groups)
    params = [sum(p.numel() for p in m.parameters()) for m in (pruned, model)]
    assert params[0] < params[1] if removed else params[0] == params[1]


def test_residual_add_to_the_network_input_is_not_pruned() -> None:
    """Minimal case found by the property above (hypothesis, 300 examples)."""
    arch = Arch(2, 3, (Block(True, 2, 1, 1, 0, False, False),), False, None, 2)
    model = build(arch, 1)
    x = _inputs(arch, 4, 1)
    groups = ChannelGroups.build(model, x[:1])
    keep = {g.id: torch.tensor([0]) for g in groups}
    with torch.no_grad():
        assert torch.allclose(
            prune_channels(model, groups, keep)(x), mask_channels(model, groups, keep)(x), **TOL
        )
