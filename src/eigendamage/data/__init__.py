"""Datasets for pruning experiments: digits (built in), MNIST, Fashion-MNIST and other IDX
folders, CIFAR-10/100, Tiny-ImageNet, ImageFolder.

Everything goes through :func:`get_datasets` / :func:`make_loaders`; bad or missing files raise
:class:`eigendamage.errors.DataError` with the offending path in the message.
"""

from .common import DataSpec, ImageDataset, Loaders, stratified_partition
from .loaders import DATASETS, DEFAULT_DATASET, canonical_name, get_datasets, make_loaders

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DataSpec",
    "ImageDataset",
    "Loaders",
    "canonical_name",
    "get_datasets",
    "make_loaders",
    "stratified_partition",
]
