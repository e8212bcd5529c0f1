"""Tiny networks for the embedded 8x8 grayscale digits, sized so tests and demos run in seconds.

``DigitsVGG`` is deliberately over-parameterized (~0.29M weights for a 64-pixel problem) so
that pruning most of it away is a meaningful demonstration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError
from ._common import check_positive_int, init_weights
from .cifar_resnet import BasicBlock
from .cifar_vgg import VGG


class DigitsVGG(VGG):
    """VGG-style net (same ``features``/``classifier`` layout as :class:`VGG`) for 8x8 digits."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, 128),
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, cfg=tuple(widths))


class DigitsResNet(nn.Module):
    """Stem, one identity-shortcut block and one 1x1-conv-shortcut block: the two cases that
    structured pruning of residual nets must handle, at toy size."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64)
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes, where="DigitsResNet")
        check_positive_int("in_channels", in_channels, where="DigitsResNet")
        widths = tuple(widths)
        if len(widths) != 2:
            raise ModelError(f"DigitsResNet: widths needs 2 block widths, got {widths!r}.")
        w0, w1 = (check_positive_int("widths entry", w, where="DigitsResNet") for w in widths)
        self.conv1 = nn.Conv2d(in_channels, w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(w0, w0, 1), BasicBlock(w0, w1, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w1, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyMLP(nn.Module):
    """Flatten -> (Linear-ReLU)* -> Linear; the smallest model for fully-connected code paths."""

    def __init__(
        self, in_features: int = 64, hidden: Sequence[int] = (64, 32), num_classes: int = 10
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features, where="TinyMLP")
        check_positive_int("num_classes", num_classes, where="TinyMLP")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            check_positive_int("hidden width", h, where="TinyMLP")
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
