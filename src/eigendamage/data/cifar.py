"""CIFAR-10 / CIFAR-100 from the official python-pickle release.

Reads either the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``) or the
original ``.tar.gz`` straight from the archive, without extracting it.  The files are
pickles; they are loaded with a restricted unpickler (:mod:`.safe_pickle`) because
unpickling an untrusted file can execute code.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eigendamage.errors import DataError

from .common import (
    ArraySource,
    DataSpec,
    ImageDataset,
    check_fraction,
    resolve_root,
    stratified_partition,
)
from .safe_pickle import load_pickle
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    PadRandomCrop,
    Pipeline,
    RandomHorizontalFlip,
)

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarFormat:
    """Where the official release keeps its files and under which keys."""

    name: str
    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarFormat(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
CIFAR100 = CifarFormat(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)
FORMATS = {fmt.name: fmt for fmt in (CIFAR10, CIFAR100)}


def _get(obj: dict[Any, Any], key: bytes) -> Any:
    """Look a key up as bytes (official Python 2 pickles) or str (re-pickled in Python 3)."""
    if key in obj:
        return obj[key]
    return obj.get(key.decode())


def _parse_batch(obj: Any, where: str, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """Validate one batch dict; return uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    label_name = fmt.label_key.decode()
    if not isinstance(obj, dict):
        raise DataError(
            f"{where} is not a {fmt.title} batch: expected a dict with keys 'data' and "
            f"{label_name!r}, found {type(obj).__name__}."
        )
    data, labels = _get(obj, b"data"), _get(obj, fmt.label_key)
    for key, value in (("data", data), (label_name, labels)):
        if value is None:
            raise DataError(f"{where} has no {key!r} entry; is it a {fmt.title} batch file?")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(
            f"{where}: 'data' has shape {shape}, expected (N, 3072) "
            "(N images of 3x32x32, channel-major)."
        )
    if data.dtype != np.uint8:
        raise DataError(f"{where}: 'data' has dtype {data.dtype}, expected uint8.")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: {label_name!r} is not a list of integers ({exc}).") from None
    if labels.shape != (len(data),):
        raise DataError(
            f"{where}: {label_name!r} has shape {labels.shape}, expected ({len(data)},), "
            "one label per image."
        )
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: {label_name!r} holds {labels.dtype} values, not integers.")
    if len(labels):
        bad = labels[(labels < 0) | (labels >= fmt.num_classes)]
        if len(bad):
            raise DataError(
                f"{where}: label {int(bad[0])} out of range 0..{fmt.num_classes - 1} "
                f"for {fmt.title} ({len(bad)} bad labels)."
            )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _class_names(obj: Any, fmt: CifarFormat) -> tuple[str, ...]:
    """Class names from the meta file, or index strings if it is absent or unusual."""
    names = _get(obj, fmt.names_key) if isinstance(obj, dict) else None
    if isinstance(names, list) and len(names) == fmt.num_classes:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(str(i) for i in range(fmt.num_classes))


def _read_folder(folder: Path, fmt: CifarFormat) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in (*fmt.train_files, fmt.test_file):
        path = folder / name
        if not path.is_file():
            raise DataError(f"missing {fmt.title} batch file {path}. Download {URL} again.")
        found[name] = load_pickle(path.read_bytes(), str(path))
    meta = folder / fmt.meta_file
    if meta.is_file():
        found[fmt.meta_file] = load_pickle(meta.read_bytes(), str(meta))
    return found


def _read_archive(archive: Path, fmt: CifarFormat) -> dict[str, Any]:
    required = (*fmt.train_files, fmt.test_file)
    wanted = {f"{fmt.folder}/{name}": name for name in (*required, fmt.meta_file)}
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    stream = tar.extractfile(member)
                    if stream is not None:
                        raw[wanted[name]] = stream.read()
                if len(raw) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read archive {archive} ({type(exc).__name__}: {exc}); it is corrupt or "
            f"truncated. Download it again from {URL}."
        ) from None
    for name in required:
        if name not in raw:
            raise DataError(
                f"archive {archive} has no member {fmt.folder}/{name} (missing {fmt.title} batch "
                f"file {name}); it is truncated or not the official archive."
            )
    return {name: load_pickle(data, f"{archive}:{fmt.folder}/{name}") for name, data in raw.items()}


def read_cifar(
    root: str | os.PathLike[str] | None, fmt: CifarFormat
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Train images/labels, test images/labels and class names from ``root``.

    ``root`` may hold the extracted folder or the archive, or be the extracted folder itself.
    """
    expected = f"{fmt.folder}/ or {fmt.archive}"
    root = resolve_root(root, fmt.name, expected)
    if (root / fmt.folder).is_dir():
        found, where = _read_folder(root / fmt.folder, fmt), root / fmt.folder
    elif root.name == fmt.folder or (root / fmt.test_file).is_file():
        found, where = _read_folder(root, fmt), root
    elif (root / fmt.archive).is_file():
        found, where = _read_archive(root / fmt.archive, fmt), root / fmt.archive
    else:
        raise DataError(
            f"no {fmt.title} data in {root}: expected {expected} in {root} "
            f"(the python version from {URL})."
        )
    train = [_parse_batch(found[n], f"{where}/{n}", fmt) for n in fmt.train_files]
    test_x, test_y = _parse_batch(found[fmt.test_file], f"{where}/{fmt.test_file}", fmt)
    train_x = np.concatenate([x for x, _ in train])  # a writable copy, safe for torch
    train_y = np.concatenate([y for _, y in train])
    names = _class_names(found.get(fmt.meta_file), fmt)
    return train_x, train_y, np.ascontiguousarray(test_x).copy(), test_y, names


def load_cifar_splits(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    seed: int = 0,
    augment: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> tuple[ImageDataset, ImageDataset, ImageDataset, DataSpec]:
    """(train, val, test, spec); val is a stratified ``val_fraction`` of the official train set.

    The split depends on ``split_seed`` only, so runs with different ``seed`` share it.
    """
    fmt = FORMATS[name]
    check_fraction(val_fraction, "val_fraction")
    train_x, train_y, test_x, test_y, names = read_cifar(root, fmt)
    val_idx, train_idx = stratified_partition(train_y, [val_fraction], split_seed)
    eval_tf = Pipeline(mean=fmt.mean, std=fmt.std)
    train_tf = (
        Pipeline([PadRandomCrop(32, 4), RandomHorizontalFlip()], fmt.mean, fmt.std)
        if augment
        else eval_tf
    )
    source = ArraySource(train_x, train_y)
    test_source = ArraySource(test_x, test_y)
    spec = DataSpec(fmt.name, fmt.num_classes, 3, (32, 32), names)
    return (
        ImageDataset(source, train_idx, train_tf, seed=seed),
        ImageDataset(source, val_idx, eval_tf, seed=seed),
        ImageDataset(test_source, np.arange(len(test_y)), eval_tf, seed=seed),
        spec,
    )
