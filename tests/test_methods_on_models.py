"""Every method prunes the paper's architectures (VGG19, ResNet32, at reduced width) and a
residual net with a 1x1-conv shortcut into a smaller model that still runs.

Tiny random inputs (2 batches of 4) and one Fisher batch: this checks the plumbing of every
method on every layer pattern, not the quality of the pruning.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eigendamage.criteria.weight_level import WEIGHT_METHODS
from eigendamage.methods import available_methods, run_pruning
from eigendamage.models import create_model

MODELS = {
    "vgg19/4": (dict(name="cifar-vgg", depth=19, width_mult=0.25), (3, 32, 32)),
    "resnet32": (dict(name="cifar-resnet", depth=32, widths=(16, 32, 64)), (3, 32, 32)),
    "digits-resnet": (dict(name="digits-resnet"), (1, 8, 8)),
}


def batches(shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, *shape, generator=g), torch.randint(0, 10, (4,), generator=g))
        for _ in range(2)
    ]


def zeros(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in model.modules() if _weighted(m))


def _weighted(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d | nn.Linear)


def prune_and_check(spec: dict, shape: tuple[int, int, int], method: str) -> None:
    torch.manual_seed(0)
    spec = dict(spec)
    model = create_model(spec.pop("name"), **spec).eval()
    data = batches(shape)
    result = run_pruning(model, data, method=method, ratio=0.3, fisher_batches=1)
    pruned = result.model.eval()
    with torch.no_grad():
        out = pruned(data[0][0])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    if method in WEIGHT_METHODS:  # weight-level: same shapes, pruned weights are zeros
        assert result.after.params == result.before.params
        assert zeros(pruned) > zeros(model) + 0.2 * result.before.params
    else:
        assert result.after.params < result.before.params
        assert result.after.flops < result.before.flops


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", available_methods())
def test_method_prunes_model(method: str, model_name: str) -> None:
    spec, shape = MODELS[model_name]
    prune_and_check(spec, shape, method)


@pytest.mark.parametrize("name", ["vgg19", "resnet32-wide"])
def test_eigendamage_prunes_the_paper_models_at_full_width(name: str) -> None:
    prune_and_check(dict(name=name), (3, 32, 32), "eigendamage")
