"""Image transforms that draw randomness from an explicit ``torch.Generator``.

torchvision's random transforms use torch's global RNG, which makes a run's augmentations
depend on whatever else consumed random numbers.  These take the generator as an argument
so a dataset can own its random stream (see :class:`eigendamage.data.common.ImageDataset`).
Geometric ops run on uint8 tensors (cheap); the final step converts to normalized float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

Op = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=gen))


class PadRandomCrop:
    """Zero-pad each side by ``padding`` and take a random ``size`` crop (the CIFAR recipe).

    ``size`` is one side of a square crop, or (height, width) for non-square images.
    """

    def __init__(self, size: int | tuple[int, int], padding: int) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.padding = padding

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        p = self.padding
        padded = F.pad(img, (p, p, p, p)) if p else img
        h, w = padded.shape[-2:]
        out_h, out_w = self.size
        top = _randint(gen, h - out_h)
        left = _randint(gen, w - out_w)
        return padded[..., top : top + out_h, left : left + out_w]


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return img.flip(-1) if float(torch.rand((), generator=gen)) < self.p else img


class RandomResizedCrop:
    """Random area/aspect crop resized to ``size`` (the ImageNet training recipe)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        height, width = img.shape[-2:]
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(gen, *self.scale)
            aspect = math.exp(_uniform(gen, *log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(gen, height - h)
                left = _randint(gen, width - w)
                break
        else:  # fall back to a central crop with the aspect ratio clamped into range
            aspect = width / height
            if aspect < self.ratio[0]:
                w, h = width, round(width / self.ratio[0])
            elif aspect > self.ratio[1]:
                h, w = height, round(height * self.ratio[1])
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        return TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)


class Resize:
    """Resize the shorter side to ``size`` keeping the aspect ratio."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return TF.resize(img, [self.size], antialias=True)


class CenterCrop:
    """Central ``size`` x ``size`` crop."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return TF.center_crop(img, [self.size, self.size])


class FitSize:
    """Resize to exactly (H, W) only if the image is not already that size (stray files)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if tuple(img.shape[-2:]) == self.size:
            return img
        return TF.resize(img, list(self.size), antialias=True)


class Pipeline:
    """Geometric ops, then conversion to float32 in [0, 1], then per-channel normalization.

    The output is always a freshly allocated tensor, so sources may hand out views.
    """

    def __init__(
        self,
        ops: Sequence[Op] = (),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.ops = tuple(ops)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for op in self.ops:
            img = op(img, gen)
        if img.dtype == torch.uint8:
            out = img.to(torch.float32).div_(255.0)
        else:
            out = img.to(torch.float32, copy=True)
        if self.mean is not None and self.std is not None:
            out.sub_(self.mean).div_(self.std)
        return out
