"""scikit-learn's 8x8 handwritten digits: the default dataset because it needs no download.

1797 images, 1 channel, 10 classes.  The train/val/test split (60/20/20, stratified) is fixed
by :data:`SPLIT_SEED` and never depends on the run seed, so every run and every pruning
method is evaluated on the same test images.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .common import ArraySource, DataSpec, ImageDataset, stratified_partition
from .transforms import Pipeline

SPLIT_SEED = 0
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    return images, bunch.target.astype(np.int64)


def digits_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of the fixed split."""
    images, labels = _raw()
    test, val, train = stratified_partition(labels, [TEST_FRACTION, VAL_FRACTION], SPLIT_SEED)
    return train, val, test


def load_digits_splits(
    *, seed: int = 0
) -> tuple[ImageDataset, ImageDataset, ImageDataset, DataSpec]:
    """(train, val, test, spec), normalized with the training split's pixel mean and std.

    No augmentation: shifting an 8x8 digit by even one pixel changes it a lot, and the
    dataset is used for fast, exactly reproducible checks.
    """
    images, labels = _raw()
    train, val, test = digits_splits()
    mean = float(images[train].mean())
    std = float(images[train].std())
    normalized = ((images - mean) / std).astype(np.float32)
    source = ArraySource(normalized, labels)
    identity = Pipeline()
    spec = DataSpec(
        name="digits",
        num_classes=10,
        in_channels=1,
        image_size=(8, 8),
        classes=tuple(str(d) for d in range(10)),
    )
    return (
        ImageDataset(source, train, identity, seed=seed),
        ImageDataset(source, val, identity, seed=seed),
        ImageDataset(source, test, identity, seed=seed),
        spec,
    )
