"""VGG with batch norm for CIFAR-sized inputs, as used in the EigenDamage paper.

The original network ends with ``AvgPool2d(2)`` on the 2x2 maps of a 32x32 input; we use
``AdaptiveAvgPool2d(1)`` instead, which is identical at 32x32 and works for any input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError
from ._common import check_positive_int, conv_bn_relu, init_weights

CFGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        *(64, 64, "M", 128, 128, "M"),
        *(256, 256, 256, 256, "M"),
        *(512, 512, 512, 512, "M"),
        *(512, 512, 512, 512),
    ),
}


def _scaled_cfg(cfg: Sequence[int | str], width_mult: float) -> list[int | str]:
    return [c if c == "M" else max(1, round(int(c) * width_mult)) for c in cfg]


class VGG(nn.Module):
    """``features`` (conv3x3-BN-ReLU blocks and 2x2 max pools) -> global avg pool -> ``classifier``.

    ``cfg`` (ints = conv widths, ``"M"`` = max pool) overrides ``depth`` for custom variants.
    """

    def __init__(
        self,
        depth: int = 19,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        *,
        cfg: Sequence[int | str] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes, where="VGG")
        check_positive_int("in_channels", in_channels, where="VGG")
        if isinstance(width_mult, bool) or not isinstance(width_mult, int | float):
            raise ModelError(f"VGG: width_mult must be a positive number, got {width_mult!r}.")
        if not 0 < width_mult < float("inf"):
            raise ModelError(f"VGG: width_mult must be a positive number, got {width_mult!r}.")
        if cfg is None:
            if depth not in CFGS:
                allowed = ", ".join(str(d) for d in sorted(CFGS))
                raise ModelError(f"VGG: depth must be one of {allowed}, got {depth!r}.")
            cfg = CFGS[depth]
        cfg = _scaled_cfg(cfg, width_mult)
        if not any(c != "M" for c in cfg):
            raise ModelError(f"VGG: cfg needs at least one conv width, got {list(cfg)!r}.")
        layers: list[nn.Module] = []
        width = in_channels
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                check_positive_int("cfg width", c, where="VGG")
                layers += conv_bn_relu(width, int(c))
                width = int(c)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
