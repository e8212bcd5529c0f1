"""CIFAR ResNet (depth 6n+2, BasicBlocks, three stages) of He et al. 2016.

With ``widths=(16, 32, 64)`` this is the standard thin ResNet-20/32/56; the EigenDamage
paper's "ResNet32" is the wide one, ``widths=(64, 128, 256)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError
from ._common import check_positive_int, init_weights


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add.

    ``downsample`` is ``None`` for an identity shortcut, else 1x1 conv(stride) + BN: the
    torchvision naming, which dependency-graph pruners understand.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages ``layer1..3`` (stride 1, 2, 2), global avg pool, ``fc``.

    ``width_mult`` scales the three stage ``widths`` (rounded, at least 1), so one name can be
    trained at the paper's widths on a GPU and at a fraction of them on a CPU.
    """

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256),
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes, where="ResNet")
        check_positive_int("in_channels", in_channels, where="ResNet")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ModelError(
                f"ResNet: depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}."
            )
        if isinstance(width_mult, bool) or not isinstance(width_mult, int | float):
            raise ModelError(f"ResNet: width_mult must be a positive number, got {width_mult!r}.")
        if not 0 < width_mult < float("inf"):
            raise ModelError(f"ResNet: width_mult must be a positive number, got {width_mult!r}.")
        widths = tuple(widths)
        if len(widths) != 3:
            raise ModelError(f"ResNet: widths needs 3 stage widths, got {widths!r}.")
        for w in widths:
            check_positive_int("widths entry", w, where="ResNet")
        widths = tuple(max(1, round(w * width_mult)) for w in widths)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        width = widths[0]
        for w, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(width, w, stride if i == 0 else 1))
                width = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
