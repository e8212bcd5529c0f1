"""MNIST, Fashion-MNIST and any other dataset in LeCun's IDX format.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), each dimension as a big-endian uint32, then the values.  A dataset is four such
files (train/t10k images and labels), each raw or gzipped.  The files may come from anyone, so
every size a header declares is checked before memory is spent on it: it is bounded by
:data:`MAX_DATA_BYTES`, a raw file must be exactly header plus data long, and a gzipped file is
decompressed in chunks to at most the declared size plus one byte, so a small "gz bomb" cannot
expand without bound.  Any bad file is one :class:`DataError` naming it.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from eigendamage.errors import DataError

from .common import (
    ArraySource,
    DataSpec,
    SplitOptions,
    Splits,
    resolve_root,
)
from .transforms import PadRandomCrop, Pipeline, RandomHorizontalFlip

#: Largest data part of one file.  The biggest IDX release in use, EMNIST ByClass's training
#: images, is 547 MB (Fashion-MNIST's and MNIST's are 47 MB); a file may make eigendamage hold
#: at most this much, and a gzipped one only if it really decompresses to that much.
MAX_DATA_BYTES = 2**30
#: Bytes decompressed per read, so memory grows only with data that is really there.
CHUNK_BYTES = 16 * 2**20
#: Zero padding of the random training crop: 2 pixels of a 28x28 image, the usual recipe.
CROP_PADDING = 2

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_UBYTE = 0x08
_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_GZIP_MAGIC = b"\x1f\x8b"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
EXPECTED = ", ".join(f"{name}[.gz]" for name in FILES)

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class IdxFormat:
    """What differs between IDX datasets: names, statistics, augmentation, where files live."""

    name: str
    title: str
    classes: tuple[str, ...] | None  # None: 0..max label, read from the files
    image_size: tuple[int, int] | None  # None: whatever the files hold
    mean: float | None  # None: computed from the training split
    std: float | None
    flip: bool  # mirror images in training (clothes: yes; digits, letters: no)
    default_root: str | None
    install: str  # how to get the files, for messages


FASHION_MNIST = IdxFormat(
    name="fashion-mnist",
    title="Fashion-MNIST",
    classes=FASHION_CLASSES,
    image_size=(28, 28),
    mean=0.2860,
    std=0.3530,
    flip=True,
    default_root="/usr/share/datasets/fashion-mnist",
    install="install them with `apt-get install dataset-fashion-mnist`, or download the four "
    ".gz files from https://github.com/zalandoresearch/fashion-mnist and pass --data-root DIR",
)
MNIST = IdxFormat(
    name="mnist",
    title="MNIST",
    classes=tuple(str(d) for d in range(10)),
    image_size=(28, 28),
    mean=0.1307,
    std=0.3081,
    flip=False,
    default_root=None,
    install="download the four .gz files from the official site "
    "(http://yann.lecun.com/exdb/mnist/) and pass --data-root DIR, the folder holding them",
)
IDX = IdxFormat(
    name="idx",
    title="IDX",
    classes=None,
    image_size=None,
    mean=None,
    std=None,
    flip=False,
    default_root=None,
    install="pass --data-root DIR, the folder that holds the four IDX files",
)
FORMATS = {fmt.name: fmt for fmt in (FASHION_MNIST, MNIST, IDX)}


def _read_upto(stream: BinaryIO, limit: int) -> bytearray:
    """At most ``limit`` bytes, read in chunks so memory follows the data actually there."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = stream.read(min(CHUNK_BYTES, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _check_magic(where: Path, head: bytes, magic: int, what: str) -> None:
    """Refuse a header that is not ``magic`` with a message saying what it is instead."""
    found = int.from_bytes(head, "big")
    expected = f"expected 0x{magic:08x} ({what})"
    if head[:2] != b"\0\0":
        raise DataError(
            f"{where} is not an IDX file: it starts with 0x{found:08x}, {expected}. "
            "Download the file again."
        )
    if head[2] != _UBYTE:
        kind = _TYPE_NAMES.get(head[2], "an unknown type")
        raise DataError(
            f"{where} holds {kind} values (IDX type code 0x{head[2]:02x}, magic 0x{found:08x}); "
            f"only unsigned bytes (0x08) are supported, {expected}."
        )
    if found != magic:
        raise DataError(
            f"{where} has {head[3]} dimension(s) (magic 0x{found:08x}), {expected}; "
            "is it the right file?"
        )


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """One IDX file (raw or gzipped) as a writable uint8 array of its declared shape.

    ``what`` describes the expected content for messages ("images: count, rows, columns").
    """
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            size = os.fstat(raw.fileno()).st_size
            with gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw as stream:
                head = bytes(_read_upto(stream, header))
                if len(head) >= 4:
                    _check_magic(path, head[:4], magic, what)
                if len(head) < header:
                    raise DataError(
                        f"{path} is truncated: {len(head)} bytes, shorter than the {header}-byte "
                        f"IDX header ({what}). Download the file again."
                    )
                dims = struct.unpack(f">{ndim}I", head[4:])
                declared = math.prod(dims)
                if declared == 0:
                    raise DataError(f"{path} declares shape {dims} ({what}): it holds no data.")
                if declared > MAX_DATA_BYTES:
                    raise DataError(
                        f"{path} declares shape {dims} ({what}), {declared} bytes, more than "
                        f"the {MAX_DATA_BYTES} bytes accepted from one IDX file; it is not a "
                        "real dataset file."
                    )
                if not gzipped and size != header + declared:
                    state = "truncated" if size < header + declared else "too long"
                    raise DataError(
                        f"{path} is {state}: its header declares shape {dims} ({what}), "
                        f"{header + declared} bytes with the header, but the file has {size}. "
                        "Download the file again."
                    )
                data = _read_upto(stream, declared + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DataError(
            f"cannot read {path} ({type(exc).__name__}: {reason}); it is corrupt or truncated. "
            "Download the file again."
        ) from None
    if len(data) != declared:
        state = f"only {len(data)}" if len(data) < declared else "more than that"
        raise DataError(
            f"{path}: its header declares shape {dims} ({what}), {declared} bytes of data, but "
            f"it holds {state}. Download the file again."
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str, fmt: IdxFormat) -> Path:
    """The raw file if present, else the gzipped one (both are read by content, not name)."""
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing {fmt.title} file {stem}[.gz] in {root}: {fmt.install}.")


def _root(root: str | os.PathLike[str] | None, fmt: IdxFormat) -> Path:
    """The folder to read: the one given, else the dataset's default (with install advice)."""
    if root is not None:
        return resolve_root(root, fmt.name, f"the four IDX files ({EXPECTED})")
    if fmt.default_root is None:
        raise DataError(f"dataset {fmt.name!r} has no default folder: {fmt.install} ({EXPECTED}).")
    path = Path(fmt.default_root)
    if not path.is_dir():
        raise DataError(
            f"{fmt.title} is not installed in {path} (its default folder): {fmt.install}."
        )
    return path


def _labels(path: Path, fmt: IdxFormat) -> np.ndarray:
    """Labels as int64, each in range when the dataset fixes its classes."""
    labels = read_idx(path, LABELS_MAGIC, "labels: count").astype(np.int64)
    if fmt.classes is not None:
        bad = np.flatnonzero(labels >= len(fmt.classes))
        if len(bad):
            raise DataError(
                f"{path}: label {labels[bad[0]]} at position {bad[0]} is out of range "
                f"0..{len(fmt.classes) - 1} for {fmt.title} ({len(bad)} bad labels)."
            )
    return labels


def _split(root: Path, images: str, labels: str, fmt: IdxFormat) -> tuple[np.ndarray, np.ndarray]:
    """One split's (N, 1, H, W) uint8 images and (N,) labels, checked against each other."""
    images_path, labels_path = _find(root, images, fmt), _find(root, labels, fmt)
    x = read_idx(images_path, IMAGES_MAGIC, "images: count, rows, columns")
    if fmt.image_size is not None and x.shape[1:] != fmt.image_size:
        h, w = fmt.image_size
        raise DataError(
            f"{images_path} holds {x.shape[1]}x{x.shape[2]} images; {fmt.title} images are "
            f"{h}x{w}. Use --data idx for other IDX datasets."
        )
    y = _labels(labels_path, fmt)
    if len(x) != len(y):
        raise DataError(
            f"{images_path} holds {len(x)} images but {labels_path} holds {len(y)} labels; "
            "the two files must come from the same release."
        )
    return x[:, None], y


def read_idx_dataset(
    root: str | os.PathLike[str] | None, fmt: IdxFormat
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images/labels and test images/labels of an IDX folder (default: ``fmt``'s)."""
    folder = _root(root, fmt)
    for stem in FILES:  # say what is missing before spending time reading the rest
        _find(folder, stem, fmt)
    train_x, train_y = _split(folder, TRAIN_IMAGES, TRAIN_LABELS, fmt)
    test_x, test_y = _split(folder, TEST_IMAGES, TEST_LABELS, fmt)
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DataError(
            f"{_find(folder, TEST_IMAGES, fmt)} holds {test_x.shape[2]}x{test_x.shape[3]} "
            f"images but {_find(folder, TRAIN_IMAGES, fmt)} holds "
            f"{train_x.shape[2]}x{train_x.shape[3]}; both splits need one size."
        )
    return train_x, train_y, test_x, test_y


def pixel_stats(images: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """Mean and std (in [0, 1] units) of uint8 ``images[indices]``, from a histogram of pixel
    values, so no float copy of the dataset is made; a constant dataset gets std 1."""
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(indices), 4096):
        counts += np.bincount(images[indices[start : start + 4096]].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    if not total:
        return 0.0, 1.0
    mean = float(values @ counts / total)
    std = float(np.sqrt(((values - mean) ** 2) @ counts / total))
    return mean, std if std > 0 else 1.0


def load_idx_splits(
    name: str, root: str | os.PathLike[str] | None, options: SplitOptions
) -> Splits:
    """(train, val, test, spec); val is a stratified ``val_fraction`` of the train files.

    The split depends on ``split_seed`` only, so runs with different ``seed`` share it.
    Training images are randomly cropped after 2-pixel padding, and mirrored for datasets
    where a mirrored image keeps its label (Fashion-MNIST, not digits).
    """
    fmt = FORMATS[name]
    options.check()
    train_x, train_y, test_x, test_y = read_idx_dataset(root, fmt)
    val_idx, train_idx = options.partition(train_y)
    if fmt.classes is not None:
        classes = fmt.classes
    else:
        classes = tuple(str(i) for i in range(int(max(train_y.max(), test_y.max())) + 1))
    if fmt.mean is not None and fmt.std is not None:
        mean, std = fmt.mean, fmt.std
    else:
        mean, std = pixel_stats(train_x, train_idx)
    size = (int(train_x.shape[2]), int(train_x.shape[3]))
    eval_tf = Pipeline(mean=(mean,), std=(std,))
    ops = [PadRandomCrop(size, CROP_PADDING)] + ([RandomHorizontalFlip()] if fmt.flip else [])
    train_tf = Pipeline(ops, (mean,), (std,))
    spec = DataSpec(fmt.name, len(classes), 1, size, classes)
    train, test = ArraySource(train_x, train_y), ArraySource(test_x, test_y)
    return options.assemble(train, test, (train_idx, val_idx), (train_tf, eval_tf), spec)
