"""Model zoo: CIFAR VGG/ResNet of the paper, tiny digits nets, and a name registry."""

from . import builtin as _builtin  # noqa: F401  (registers the built-in models)
from .cifar_resnet import BasicBlock, ResNet
from .cifar_vgg import VGG
from .registry import (
    create_from_spec,
    create_model,
    default_input_shape,
    list_models,
    register_model,
)
from .small import DigitsResNet, DigitsVGG, TinyMLP

__all__ = [
    "VGG",
    "BasicBlock",
    "DigitsResNet",
    "DigitsVGG",
    "ResNet",
    "TinyMLP",
    "create_from_spec",
    "create_model",
    "default_input_shape",
    "list_models",
    "register_model",
]
