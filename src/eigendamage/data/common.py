"""Pieces shared by every dataset format.

All formats feed one :class:`ImageDataset` (an image *source* plus a list of indices plus a
transform), so splitting, augmentation and seeding behave identically for in-memory arrays
(digits, CIFAR) and image files (Tiny-ImageNet, ImageFolder).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms.v2.functional import pil_to_tensor

from eigendamage.errors import ConfigError, DataError

from .transforms import Transform

#: File extensions treated as images when scanning folders (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about a dataset to be built for it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    classes: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input, e.g. for FLOP counting."""
        return (self.in_channels, *self.image_size)


@dataclass
class Loaders:
    """The three loaders of one run plus the dataset description."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    spec: DataSpec


class ImageSource(Protocol):
    """Random access to (image, label) pairs before any transform."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, index: int) -> torch.Tensor: ...


class ArraySource:
    """Images held in memory as one (N, C, H, W) array: uint8 in [0, 255] or float in [0, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"bad array shapes {images.shape} / {labels.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        # A view; every transform allocates a new tensor before anything is written.
        return torch.from_numpy(self.images[index])


class FileSource:
    """Images read lazily from files (so an ImageNet-sized folder costs no memory up front)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | np.ndarray) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index])


def read_bounded(path: Path, limit: int, too_big: str) -> bytes:
    """A file's bytes, refusing one over ``limit`` bytes before reading it (``too_big``
    finishes the message: what such a file is and what to do)."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"{path} is {size} bytes, more than {too_big}")
        with path.open("rb") as stream:
            data = stream.read(size + 1)  # read(n) allocates n bytes up front
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}.") from None
    if len(data) > size:
        raise DataError(f"{path} grew while it was read; read it again when it is complete.")
    return data


def read_image(path: Path) -> torch.Tensor:
    """Read one image file as uint8 RGB (3, H, W); a bad file becomes a DataError naming it.

    Pillow only warns about an image of one to two times ``Image.MAX_IMAGE_PIXELS`` (and
    refuses bigger ones); both are refused here, so a small file cannot claim an image that
    takes gigabytes to decode, and no warning text lands on stderr.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # forces a full decode, so truncation shows up here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"cannot read image file {path}: {exc} Replace the file, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the image is genuine."
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise DataError(
            f"cannot read image file {path}: {exc}. Replace or delete the file."
        ) from None
    return pil_to_tensor(rgb)


class ImageDataset(Dataset):
    """A split of a source: ``indices`` into it, with a transform driven by its own generator.

    The generator (not torch's global RNG) makes augmentation reproducible from ``seed``
    alone; in DataLoader workers it is reseeded per worker from the loader's generator (see
    :func:`reseed_worker`), so workers do not repeat each other's augmentations.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int] | np.ndarray,
        transform: Transform,
        *,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        image = self.transform(self.source.load(j), self.generator)
        return image, int(self.source.labels[j])

    @property
    def targets(self) -> np.ndarray:
        """Labels of this split, in index order (for class counts, stratification checks)."""
        return self.source.labels[self.indices]

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream."""
        self.generator.manual_seed(seed)


Splits = tuple[ImageDataset, ImageDataset, ImageDataset, DataSpec]


@dataclass(frozen=True)
class SplitOptions:
    """The choices every file format shares.

    ``seed`` drives the training augmentation stream only; which samples land in val depends
    on ``split_seed`` alone, so runs with different seeds are evaluated on the same data.
    ``val_fraction`` of the training files becomes val; ``augment=False`` trains on the
    plain (evaluation) transform.
    """

    seed: int = 0
    augment: bool = True
    val_fraction: float = 0.1
    split_seed: int = 0

    def check(self) -> SplitOptions:
        """Refuse a bad ``val_fraction`` before any file is read; returns the options."""
        check_fraction(self.val_fraction, "val_fraction")
        return self

    def partition(self, labels: Sequence[int] | np.ndarray, held_out: int = 1) -> list[np.ndarray]:
        """``held_out`` stratified parts of ``val_fraction`` each, then the rest (training)."""
        return stratified_partition(labels, [self.val_fraction] * held_out, self.split_seed)

    def assemble(
        self,
        source: ImageSource,
        test: ImageSource,
        parts: tuple[np.ndarray, np.ndarray],
        transforms: tuple[Transform, Transform],
        spec: DataSpec,
    ) -> Splits:
        """(train, val, test, spec) of a format with a separate test set.

        Args:
            source: the training files.
            test: the test set, used whole.
            parts: (train, val) indices into ``source``.
            transforms: (augmenting, plain); training uses the first when ``augment`` is
                set, val and test always the second.
            spec: the dataset's description.

        Returns:
            The three datasets and ``spec``.
        """
        augmenting, plain = transforms
        train_tf = augmenting if self.augment else plain
        return (
            ImageDataset(source, parts[0], train_tf, seed=self.seed),
            ImageDataset(source, parts[1], plain, seed=self.seed),
            ImageDataset(test, np.arange(len(test)), plain, seed=self.seed),
            spec,
        )


def reseed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the worker's augmentation stream from its torch seed.

    The worker's torch seed is derived from the loader's generator, so a seeded loader gives
    the same augmentations on every run and different ones in every worker and epoch.
    """
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, ImageDataset):
        info.dataset.reseed(info.seed)


def resolve_root(root: str | os.PathLike[str] | None, dataset: str, expected: str) -> Path:
    """Check the user's data root before looking inside it, with a message saying what to pass."""
    if root is None:
        raise DataError(
            f"dataset {dataset!r} is read from files: pass --data-root DIR, "
            f"the folder that holds {expected}."
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(
            f"data root {path} does not exist (dataset {dataset!r} expects {expected})."
        )
    if not path.is_dir():
        raise DataError(
            f"data root {path} is not a directory (expected a folder holding {expected})."
        )
    return path


def check_fraction(value: float, what: str) -> float:
    """Validate a split fraction given by the user."""
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {value}.")
    return float(value)


def stratified_partition(
    labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into ``len(fractions) + 1`` sorted, disjoint parts; the last is the rest.

    Every class is shuffled (from ``seed``) and its members spread evenly over (0, 1); sorting
    all samples by that position makes every prefix as class-balanced as integer counts allow.
    Part sizes are exactly ``round(N * fraction)``, even with classes of one or two samples
    (where sklearn's stratified splitters refuse to work).
    """
    labels = np.asarray(labels)
    n = len(labels)
    counts = [round(n * check_fraction(f, "split fraction")) for f in fractions]
    if sum(counts) >= n:
        raise DataError(
            f"cannot split {n} samples into fractions {list(fractions)} and keep any for training."
        )
    rng = np.random.default_rng(seed)
    position = np.empty(n, dtype=np.float64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        spread = (np.arange(len(members)) + 0.5) / len(members)
        position[members[rng.permutation(len(members))]] = spread
    order = np.lexsort((rng.random(n), position))  # random tie-break between classes
    parts, start = [], 0
    for k in counts:
        parts.append(np.sort(order[start : start + k]))
        start += k
    parts.append(np.sort(order[start:]))
    return parts


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, following links), sorted for determinism.

    A directory that is its own ancestor (a symlink loop) is not entered again, so the scan
    ends; FIFOs and devices are skipped, since opening one would block or never end.  A
    broken link is kept, so reading it later fails with a message naming it.
    """
    found: list[Path] = []
    stack: list[tuple[str, frozenset[tuple[int, int]]]] = [(os.fspath(folder), frozenset())]
    while stack:
        current, ancestors = stack.pop()
        try:
            info = os.stat(current)
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                continue
            with os.scandir(current) as scan:
                entries = list(scan)
        except OSError:  # unreadable folders are skipped, as os.walk does
            continue
        inside = ancestors | {key}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    stack.append((entry.path, inside))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and (
                    entry.is_file() or not os.path.exists(entry.path)
                ):
                    found.append(Path(entry.path))
            except OSError:
                continue
    return sorted(found)
