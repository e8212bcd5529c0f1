"""Channel methods on transformers: attention heads are removed whole and exactly.

For each adapter (timm fused qkv, HF BERT separate projections, GPT-2 fused ``c_attn``,
LLaMA grouped-query attention) the pruned model must compute what the masked model computes
(removed heads zeroed), the masking must actually change the model, the head-count
attributes must follow, and a save/load round trip must reproduce the outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from eigendamage.io import load_model, save_model
from eigendamage.methods.channel import channel_prune
from eigendamage.models import create_model
from eigendamage.models.registry import example_input
from eigendamage.structure import ChannelGroups, mask_channels, prune_channels
from eigendamage.structure.heads import find_heads

pytest.importorskip("transformers")
pytest.importorskip("timm")

CASES = {
    "timm-vit": ("timm:vit_tiny_patch16_224", dict(depth=1, img_size=32), "num_heads", 3),
    "bert": (
        "hf:bert-base-uncased",
        dict(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=50,
        ),
        "num_attention_heads",
        4,
    ),
    "gpt2": (
        "hf-lm:gpt2",
        dict(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16),
        "num_heads",
        4,
    ),
    "llama-gqa": (
        "hf-lm:llama",
        dict(
            num_hidden_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=50,
        ),
        None,
        2,  # units are key/value heads, each with its 2 query heads
    ),
}


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("case", list(CASES))
def test_heads_are_removed_whole_and_exactly(case: str, tmp_path: Path) -> None:
    name, kwargs, attr, units = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = example_input(model, 2)
    groups = ChannelGroups.build(model, x[:1])
    (layout,) = groups.heads
    head_group = groups[layout.module]
    assert head_group.size == units
    # No other group cuts the projections' head dimension.
    for g in groups:
        if g.id != layout.module:
            assert not {(m.module, m.dim) for m in g.members} & (
                {(n, "out") for n, _ in layout.rows} | {(n, "in") for n, _ in layout.cols}
            )
    keep = {g.id: torch.arange(g.size)[1::2] for g in groups}  # drops unit 0, keeps unit 1
    pruned = prune_channels(model, groups, keep)
    masked = mask_channels(model, groups, keep)
    assert not torch.allclose(logits(masked, x), logits(model, x))  # the mask removes something
    torch.testing.assert_close(logits(pruned, x), logits(masked, x), atol=1e-5, rtol=1e-4)
    attention = pruned.get_submodule(layout.module)
    if attr is not None:
        assert getattr(attention, attr) == getattr(model.get_submodule(layout.module), attr) // 2
    save_model(pruned, tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, x), logits(pruned, x))


@pytest.mark.parametrize("method", ["l1", "kron-obs"])
@pytest.mark.parametrize("case", ["timm-vit", "bert"])
def test_channel_methods_prune_heads_of_transformers(case: str, method: str) -> None:
    name, kwargs, attr, units = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).eval()
    x = example_input(model, 4)
    y = torch.randint(0, 3, (4,))
    pruned, info = channel_prune(
        model, [(x, y)], method=method, example_inputs=x[:1], ratio=0.5, fisher_batches=1
    )
    layout = find_heads(model)[0][0]
    assert layout.module in info["group_scores"]
    assert info["params"][1] < info["params"][0]
    assert torch.isfinite(logits(pruned, x)).all()


def test_multihead_attention_projections_stay_whole() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = ChannelGroups.build(vit, x[:1])
    assert not groups.heads
    cut = {(m.module, m.dim) for g in groups for m in g.members}
    assert not any("self_attention" in module for module, _ in cut)
    keep = {g.id: torch.arange(g.size)[::2] for g in groups}
    torch.testing.assert_close(
        logits(prune_channels(vit, groups, keep), x), logits(mask_channels(vit, groups, keep), x)
    )
