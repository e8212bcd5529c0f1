"""Shared building blocks and argument checks for the model zoo."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError


def check_positive_int(name: str, value: object, *, where: str) -> int:
    """Reject non-positive or non-integer sizes with a ModelError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{where}: {name} must be a positive integer, got {value!r}.")
    return value


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (no bias: BN makes it redundant) + BN + ReLU, as separate modules.

    ReLU is not in-place so that module hooks (K-FAC, counting) can safely see every tensor.
    """
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def init_weights(model: nn.Module, *, linear_std: float | None = None) -> None:
    """Kaiming-normal convs, BN weight 1 / bias 0; optionally N(0, std) Linear with zero bias.

    The original EigenDamage code set the BN weight to 0.5; we use the PyTorch default 1,
    which trains at least as well and keeps BN an identity at init.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
