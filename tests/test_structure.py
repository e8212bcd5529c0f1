"""Channel groups (torch-pruning dependency graph), physical removal and its masked reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigendamage.errors import ModelError
from eigendamage.structure import ChannelGroups, mask_channels, prune_channels
from eigendamage.surgery.channels import apply_weight_update_


def _cbr(c_in: int, c_out: int, **kw) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Stack(nn.Module):
    """conv-BN-ReLU x3 -> global pool -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8), _cbr(8, 12), _cbr(12, 6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, an identity-shortcut block, a 1x1-conv-shortcut block, classifier (flattened)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.block1 = Block(8, 8)
        self.block2 = Block(8, 10, stride=2)
        self.fc = nn.Linear(10 * 2 * 2, 3)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv; biases everywhere, no BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 5, 3, padding=1)
        self.merge = nn.Conv2d(9, 7, 3, padding=1)
        self.fc = nn.Linear(7, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        return self.fc(torch.relu(self.merge(x)).mean((2, 3)))


class DepthwiseNet(nn.Module):
    """conv-BN-ReLU -> depthwise 3x3-BN-ReLU -> pointwise -> classifier."""

    def __init__(self, groups: int | None = None) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.dw = _cbr(8, 8, groups=groups or 8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.stem(x))).mean((2, 3)))


MODELS = [Stack, TinyResNet, ConcatNet, DepthwiseNet]


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters so masking is really exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def _members(groups: ChannelGroups) -> dict[str, set[tuple[str, str]]]:
    return {g.id: {(m.module, m.dim) for m in g.members} for g in groups}


def test_stack_groups_couple_conv_bn_and_next_input() -> None:
    groups = ChannelGroups.build(Stack(), torch.randn(1, 3, 8, 8))
    assert groups.ignored == ("fc",)
    members = _members(groups)
    assert len(groups) == 3
    assert members["features.1.0"] == {
        ("features.1.0", "out"),
        ("features.1.1", "out"),
        ("features.2.0", "in"),
    }
    assert ("fc", "in") in members["features.2.0"]
    assert all(m.dim == "in" for g in groups for m in g.members if m.module == "fc")
    assert groups.root_layers() == ["features.0.0", "features.1.0", "features.2.0"]


def test_residual_stage_ties_stem_block_output_and_shortcut_input() -> None:
    groups = ChannelGroups.build(TinyResNet(), torch.randn(1, 3, 8, 8))
    stage = next(g for g in groups if ("stem.0", "out") in _members(groups)[g.id])
    names = {(m.module, m.dim) for m in stage.members}
    assert {("block1.conv2", "out"), ("block2.conv1", "in"), ("block2.shortcut.0", "in")} <= names
    assert {r.module for r in stage.roots} == {"stem.0", "block1.conv2"}
    stage2 = next(g for g in groups if ("block2.conv2", "out") in _members(groups)[g.id])
    assert {r.module for r in stage2.roots} == {"block2.conv2", "block2.shortcut.0"}
    fc = next(m for m in stage2.members if m.module == "fc")
    assert len(fc.index) == 4 * stage2.size  # flatten: one channel -> 2x2 inputs
    assert torch.equal(fc.channel, fc.index // 4)


def test_concat_offsets_second_branch() -> None:
    groups = ChannelGroups.build(ConcatNet(), torch.randn(1, 3, 8, 8))
    right = next(g for g in groups if g.id == "right")
    merge_in = next(m for m in right.members if m.module == "merge" and m.dim == "in")
    assert torch.equal(merge_in.index.sort().values, torch.arange(4, 9))


def test_depthwise_channels_tied_to_producer() -> None:
    groups = ChannelGroups.build(DepthwiseNet(), torch.randn(1, 3, 8, 8))
    stem = next(g for g in groups if ("stem.0", "out") in _members(groups)[g.id])
    kinds = {(m.module, m.kind) for m in stem.members}
    assert ("dw.0", "depthwise") in kinds and ("dw.1", "bn") in kinds
    assert ("pw", "in") in {(m.module, m.dim) for m in stem.members}


def test_grouped_conv_groups_are_skipped() -> None:
    groups = ChannelGroups.build(DepthwiseNet(groups=2), torch.randn(1, 3, 8, 8))
    assert groups.skipped and all("grouped conv" in r for r in groups.skipped.values())
    assert all(m.module != "dw.0" for g in groups for m in g.members)


def test_ignored_layers() -> None:
    groups = ChannelGroups.build(Stack(), torch.randn(1, 3, 8, 8), ignored_layers=["features.1.0"])
    assert "features.1.0" not in groups.root_layers()
    assert set(groups.ignored) == {"fc", "features.1.0"}
    with pytest.raises(ModelError, match="not in the model"):
        ChannelGroups.build(Stack(), torch.randn(1, 3, 8, 8), ignored_layers=["nope"])


@pytest.mark.parametrize("cls", MODELS)
def test_pruned_equals_masked_and_input_untouched(cls) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(cls()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = ChannelGroups.build(model, torch.randn(1, 3, 8, 8))
    assert model.training
    gen = torch.Generator().manual_seed(0)
    keep = {g.id: torch.randperm(g.size, generator=gen)[: max(1, g.size // 2)] for g in groups}
    pruned = prune_channels(model, groups, keep)
    masked = mask_channels(model, groups, keep)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(pruned) is cls and not pruned._forward_hooks
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(5, 3, 8, 8)
    pruned.eval(), masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=0)
    reloaded = prune_channels(cls(), groups, keep)  # same shapes: a plain state_dict fits
    reloaded.load_state_dict(pruned.state_dict())


def test_removal_plan_validation() -> None:
    groups = ChannelGroups.build(Stack(), torch.randn(1, 3, 8, 8))
    gid = groups.groups[0].id
    with pytest.raises(ModelError, match="at least one"):
        groups.removal_plan({gid: torch.tensor([], dtype=torch.long)})
    with pytest.raises(ModelError, match=r"\[0, 8\)"):
        groups.removal_plan({gid: torch.tensor([8])})


def test_apply_weight_update_adds_to_weight_and_bias() -> None:
    model = ConcatNet()
    ref = ConcatNet()
    ref.load_state_dict(model.state_dict())
    delta = torch.randn(4, 6 + 1)
    apply_weight_update_(model, {"left": delta})
    torch.testing.assert_close(model.left.weight, ref.left.weight + delta[:, :6].view(4, 6, 1, 1))
    torch.testing.assert_close(model.left.bias, ref.left.bias + delta[:, 6])
    with pytest.raises(ModelError, match="does not fit"):
        apply_weight_update_(model, {"left": torch.randn(4, 3)})


def test_a_graph_torch_pruning_cannot_follow_is_a_model_error() -> None:
    """ShuffleNet's channel shuffle makes torch-pruning divide by zero: one clear error."""
    from torchvision.models import shufflenet_v2_x0_5

    model = shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(ModelError, match="ShuffleNetV2.*method='eigendamage'"):
        ChannelGroups.build(model, torch.randn(1, 3, 32, 32))


def test_channel_counts_torch_pruning_cannot_infer_are_a_model_error_not_a_memory_blowup() -> None:
    """torchvision Swin-T: torch-pruning gives up inferring a reshape's channels and would
    then expand indices until memory runs out; the warning it gives is turned into an error."""
    from torchvision.models import swin_t

    model = swin_t(num_classes=10).eval()
    with pytest.raises(ModelError, match="SwinTransformer.*could not infer the channel counts"):
        ChannelGroups.build(model, torch.randn(1, 3, 64, 64))


def test_runaway_index_expansion_is_a_model_error_not_a_memory_blowup() -> None:
    """torchvision Swin V2: torch-pruning's flatten mapping multiplies channel indices
    through the window reshapes until the OOM killer; the expansion is capped."""
    from torchvision.models import swin_v2_t

    model = swin_v2_t(num_classes=10).eval()
    with pytest.raises(ModelError, match="SwinTransformer.*grew past"):
        ChannelGroups.build(model, torch.randn(1, 3, 64, 64))
