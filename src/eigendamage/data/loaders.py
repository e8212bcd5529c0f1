"""Dataset registry: one entry point that turns a dataset name into splits or loaders."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from eigendamage.errors import ConfigError, unknown_name

from .cifar import load_cifar_splits
from .common import Loaders, SplitOptions, Splits, reseed_worker
from .digits import load_digits_splits
from .idx import load_idx_splits
from .imagefolder import load_imagefolder_splits
from .tiny_imagenet import load_tiny_imagenet_splits

DATASETS = (
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "tiny-imagenet",
    "imagefolder",
    "idx",
)
DEFAULT_DATASET = "digits"
_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tinyimagenet": "tiny-imagenet",
    "tiny-imagenet-200": "tiny-imagenet",
    "image-folder": "imagefolder",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
}

Root = str | os.PathLike[str] | None


def canonical_name(name: str) -> str:
    """Normalize a dataset name (case, ``_`` vs ``-``, common spellings) or raise ConfigError."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ConfigError(unknown_name("dataset", name, DATASETS))
    return key


def get_datasets(
    name: str = DEFAULT_DATASET,
    root: Root = None,
    *,
    seed: int = 0,
    augment: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    image_size: int | None = None,
) -> Splits:
    """Build (train, val, test, spec) for dataset ``name`` read from ``root``.

    ``seed`` drives the training augmentation stream only; which samples land in val depends
    on ``split_seed`` alone, so runs with different seeds are evaluated on the same data.
    ``digits`` ignores ``root``, ``augment`` and ``val_fraction`` (fixed 60/20/20 split);
    ``fashion-mnist`` reads the Debian package's folder when ``root`` is None;
    ``image_size`` applies only to ``imagefolder``.
    """
    key = canonical_name(name)
    if image_size is not None and key != "imagefolder":
        raise ConfigError(
            f"image_size applies only to the 'imagefolder' dataset; {key!r} has a fixed size."
        )
    options = SplitOptions(
        seed=seed, augment=augment, val_fraction=val_fraction, split_seed=split_seed
    )
    if key == "digits":
        return load_digits_splits(seed=seed)
    if key in ("cifar10", "cifar100"):
        return load_cifar_splits(key, root, options)
    if key in ("mnist", "fashion-mnist", "idx"):
        return load_idx_splits(key, root, options)
    if key == "tiny-imagenet":
        return load_tiny_imagenet_splits(root, options)
    return load_imagefolder_splits(root, options, image_size)


def make_loaders(
    name: str = DEFAULT_DATASET,
    root: Root = None,
    *,
    batch_size: int = 128,
    seed: int = 0,
    augment: bool = True,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    image_size: int | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> Loaders:
    """Train/val/test DataLoaders whose order and augmentation are fixed by ``seed``.

    The training loader shuffles with a ``torch.Generator`` seeded from ``seed`` (and its
    workers derive their augmentation seeds from it), so two runs with the same seed see
    the same batches; val/test are never shuffled or augmented.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {eval_batch_size}.")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}.")
    train, val, test, spec = get_datasets(
        name,
        root,
        seed=seed,
        augment=augment,
        val_fraction=val_fraction,
        split_seed=split_seed,
        image_size=image_size,
    )
    common = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers:
        common["worker_init_fn"] = reseed_worker
    eval_bs = eval_batch_size or batch_size
    return Loaders(
        train=DataLoader(
            train,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=drop_last,
            **common,
        ),
        val=DataLoader(val, batch_size=eval_bs, shuffle=False, **common),
        test=DataLoader(test, batch_size=eval_bs, shuffle=False, **common),
        spec=spec,
    )
