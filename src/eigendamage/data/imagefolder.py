"""A generic ``root/{train,val,test}/<class>/<image>`` tree (any images, any size).

``val/`` and ``test/`` are optional; a missing one is split off ``train/`` (stratified,
seeded by ``split_seed``).  Class folders must be the same in every split, since a class
index means the same class everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from eigendamage.errors import ConfigError, DataError

from .common import (
    DataSpec,
    FileSource,
    ImageDataset,
    SplitOptions,
    Splits,
    list_images,
    resolve_root,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Pipeline,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
)

DEFAULT_IMAGE_SIZE = 224


def _classes(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"no class folders in {folder}: expected {folder}/<class>/<image files>.")
    return names


def _scan(folder: Path, classes: list[str]) -> FileSource:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = list_images(folder / name)
        if not files:
            raise DataError(f"class folder {folder / name} has no images.")
        paths.extend(files)
        labels.extend([label] * len(files))
    return FileSource(paths, labels)


def _check_same_classes(folder: Path, classes: list[str], train: Path) -> None:
    found = _classes(folder)
    if found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"class folders in {folder} differ from those in {train}: "
            f"missing {missing or 'none'}, extra {extra or 'none'}. Every split needs the same "
            "class folders."
        )


def load_imagefolder_splits(
    root: str | os.PathLike[str] | None, options: SplitOptions, image_size: int | None = None
) -> Splits:
    """(train, val, test, spec) at ``image_size`` (default 224) with ImageNet normalization.

    A missing ``val/`` or ``test/`` is split off train, each ``val_fraction`` of it.
    """
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size}.")
    options.check()
    base = resolve_root(root, "imagefolder", "train/<class>/<images> (and optionally val/, test/)")
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"no image folder layout in {base}: expected {train_dir}/<class>/<images> "
            "(and optionally val/ and test/ with the same class folders)."
        )
    classes = _classes(train_dir)
    train_src = _scan(train_dir, classes)
    others: dict[str, FileSource] = {}
    for split in ("val", "test"):
        folder = base / split
        if folder.is_dir():
            _check_same_classes(folder, classes, train_dir)
            others[split] = _scan(folder, classes)

    missing = [s for s in ("val", "test") if s not in others]
    *split_parts, train_idx = options.partition(train_src.labels, len(missing))
    parts = dict(zip(missing, split_parts, strict=True))

    eval_tf = Pipeline(
        [Resize(round(size * 256 / 224)), CenterCrop(size)], IMAGENET_MEAN, IMAGENET_STD
    )
    train_tf = (
        Pipeline([RandomResizedCrop(size), RandomHorizontalFlip()], IMAGENET_MEAN, IMAGENET_STD)
        if options.augment
        else eval_tf
    )

    def split(name: str) -> ImageDataset:
        if name in others:
            src = others[name]
            return ImageDataset(src, np.arange(len(src)), eval_tf, seed=options.seed)
        return ImageDataset(train_src, parts[name], eval_tf, seed=options.seed)

    spec = DataSpec("imagefolder", len(classes), 3, (size, size), tuple(classes))
    return (
        ImageDataset(train_src, train_idx, train_tf, seed=options.seed),
        split("val"),
        split("test"),
        spec,
    )
