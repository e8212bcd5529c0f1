"""Models from torchvision and timm, always built without pretrained weights (no network)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ModelError, unknown_name
from ._common import check_positive_int


def create_external(
    name: str, num_classes: int, in_channels: int | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build ``source:model``; returns the model and its natural (C, H, W) input size."""
    source, _, model_name = name.partition(":")
    check_positive_int("num_classes", num_classes, where=name)
    if in_channels is not None:
        check_positive_int("in_channels", in_channels, where=name)
    for key in ("weights", "pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if key in kwargs:
            raise ModelError(
                f"{name}: {key!r} is not supported; models are built without downloading "
                "weights. Load a checkpoint into the built model instead."
            )
    if source == "torchvision":
        return _torchvision(model_name, num_classes, in_channels or 3, kwargs)
    if source == "timm":
        return _timm(model_name, num_classes, in_channels or 3, kwargs)
    raise ModelError(unknown_name("model source", source, ("torchvision", "timm")))


def _torchvision(
    name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]
) -> tuple[nn.Module, tuple[int, int, int]]:
    import torchvision

    choices = torchvision.models.list_models()
    if name not in choices:
        raise ModelError(unknown_name("torchvision model", name, choices))
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot build torchvision:{name} with {kwargs!r}: {e}") from e
    if in_channels != 3:
        _replace_stem(model, in_channels, f"torchvision:{name}")
    return model, (in_channels, 224, 224)


def _replace_stem(model: nn.Module, in_channels: int, where: str) -> None:
    """torchvision models are hard-wired to RGB: swap the first 3-channel conv for a new one.

    The first registered ``Conv2d`` with 3 input channels is taken to be the stem, which holds
    for torchvision's classification models (they define the stem first).
    """
    for name, child in model.named_modules():
        if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
            new = nn.Conv2d(
                in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return
    raise ModelError(f"{where}: found no 3-channel input conv to adapt to {in_channels} channels.")


def _timm(
    name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]
) -> tuple[nn.Module, tuple[int, int, int]]:
    try:
        import timm
    except ImportError as e:
        raise ModelError(
            f"timm:{name} needs the optional package timm: pip install 'eigendamage[models]'."
        ) from e
    if not timm.is_model(name):
        raise ModelError(unknown_name("timm model", name, timm.list_models()))
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot build timm:{name} with {kwargs!r}: {e}") from e
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    return model, (in_channels, int(size[-2]), int(size[-1]))
