"""Registrations of the built-in models (imported by ``eigendamage.models``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .cifar_resnet import ResNet
from .cifar_vgg import VGG
from .registry import register_model
from .small import DigitsResNet, DigitsVGG, TinyMLP

THIN = (16, 32, 64)
WIDE = (64, 128, 256)


def _vgg(depth: int) -> None:
    @register_model(f"vgg{depth}")
    def build(num_classes: int, in_channels: int, width_mult: float = 1.0) -> nn.Module:
        return VGG(depth, num_classes, in_channels, width_mult)


def _resnet(name: str, depth: int, widths: Sequence[int]) -> None:
    @register_model(name)
    def build(
        num_classes: int,
        in_channels: int,
        widths: Sequence[int] = widths,
        width_mult: float = 1.0,
    ) -> nn.Module:
        return ResNet(depth, num_classes, in_channels, widths, width_mult)


for _d in (11, 13, 16, 19):
    _vgg(_d)
for _d in (20, 32, 44, 56, 110):
    _resnet(f"resnet{_d}", _d, THIN)
_resnet("resnet32-wide", 32, WIDE)


@register_model("cifar-vgg")
def cifar_vgg(
    num_classes: int, in_channels: int, depth: int = 19, width_mult: float = 1.0
) -> nn.Module:
    """Any-depth VGG, for configs that set ``depth`` as an argument."""
    return VGG(depth, num_classes, in_channels, width_mult)


@register_model("cifar-resnet")
def cifar_resnet(
    num_classes: int,
    in_channels: int,
    depth: int = 32,
    widths: Sequence[int] = THIN,
    width_mult: float = 1.0,
) -> nn.Module:
    """Any-depth (6n+2) CIFAR ResNet, thin by default like ``resnetN``."""
    return ResNet(depth, num_classes, in_channels, widths, width_mult)


# The paper's models for 28x28 grayscale (Fashion-MNIST, MNIST), at a width a CPU can train.
# Params / FLOPs (MACs, ``eigendamage.measure.count``) of one 1x28x28 image, 10 classes.


@register_model("fmnist-vgg19", input_size=(1, 28, 28))
def fmnist_vgg19(num_classes: int, in_channels: int, width_mult: float = 0.25) -> nn.Module:
    """VGG19-BN for 28x28 inputs (4 max pools: 28 -> 14 -> 7 -> 3 -> 1).

    width_mult 0.25 (default): 1.26M params, 16.2M FLOPs; 1.0 (the paper's widths, for a
    GPU): 20.03M params, 257.6M FLOPs.
    """
    return VGG(19, num_classes, in_channels, width_mult)


@register_model("fmnist-resnet32", input_size=(1, 28, 28))
def fmnist_resnet32(num_classes: int, in_channels: int, width_mult: float = 0.5) -> nn.Module:
    """The paper's ResNet32 (stage widths 64, 128, 256 at width_mult 1.0) for 28x28 inputs.

    width_mult 0.5 (default, widths 32, 64, 128): 1.86M params, 210.6M FLOPs; 1.0 (for a
    GPU): 7.43M params, 841.8M FLOPs.
    """
    return ResNet(32, num_classes, in_channels, WIDE, width_mult)


@register_model("digits-vgg", input_size=(1, 8, 8))
def digits_vgg(
    num_classes: int,
    in_channels: int,
    widths: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, 128),
) -> nn.Module:
    return DigitsVGG(num_classes, in_channels, widths)


@register_model("digits-resnet", input_size=(1, 8, 8))
def digits_resnet(
    num_classes: int, in_channels: int, widths: Sequence[int] = (32, 64)
) -> nn.Module:
    return DigitsResNet(num_classes, in_channels, widths)


@register_model("tiny-mlp", input_size=(1, 8, 8))
def tiny_mlp(
    num_classes: int, in_channels: int, hidden: Sequence[int] = (64, 32), image_size: int = 8
) -> nn.Module:
    """MLP over flattened ``in_channels x image_size x image_size`` inputs."""
    return TinyMLP(in_channels * image_size * image_size, hidden, num_classes)
