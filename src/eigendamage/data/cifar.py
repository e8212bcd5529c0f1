"""CIFAR-10 / CIFAR-100 from the official python-pickle release.

Reads either the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``) or the
original ``.tar.gz`` straight from the archive, without extracting it.  The files are
pickles; they are loaded with a restricted unpickler (:mod:`.safe_pickle`) because
unpickling an untrusted file can execute code, or declare arrays far larger than itself.
Every array is then checked against the format (shape, dtype, one label in range per image)
and every meta name must be printable UTF-8, so a bad file is one :class:`DataError` naming
the file and the key.
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
    SplitOptions,
    Splits,
    read_bounded,
    resolve_root,
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


#: Largest batch or meta file read (the biggest official one, CIFAR-100 ``train``, is 155 MB);
#: a bigger file, or archive member, is refused before it is read into memory.
MAX_FILE_BYTES = 512 * 2**20
#: Longest class name accepted from a meta file.
MAX_NAME_CHARS = 200
_MISSING = object()


def _get(obj: dict[Any, Any], key: bytes) -> Any:
    """Look a key up as bytes (official Python 2 pickles) or str (re-pickled in Python 3)."""
    if key in obj:
        return obj[key]
    return obj.get(key.decode(), _MISSING)


def _number(value: int) -> str:
    """A label value for a message; a huge one is described, not printed in full."""
    return str(value) if -(10**12) < value < 10**12 else f"of {value.bit_length()} bits"


def _check_labels(labels: Any, n: int, where: str, fmt: CifarFormat) -> np.ndarray:
    """One integer label in ``0..num_classes-1`` per image, as a list (official) or 1-D array.
    Element types are checked before any conversion, so strings, bools, nested lists or huge
    integers cannot turn into a (possibly huge) array of something else."""
    name = fmt.label_key.decode()
    if isinstance(labels, np.ndarray):
        values = np.asarray(labels)
        if values.dtype.kind not in "iu":
            raise DataError(f"{where}: {name!r} holds {values.dtype} values, not integers.")
        shape = values.shape
    elif isinstance(labels, (list, tuple)):
        shape = (len(labels),)
        if shape == (n,):
            for i, value in enumerate(labels):
                if type(value) is not int:  # also refuses bools, which numpy takes as 0/1
                    raise DataError(
                        f"{where}: {name!r}[{i}] is a {type(value).__name__}, not an integer label."
                    )
        values = labels  # type: ignore[assignment]
    else:
        raise DataError(
            f"{where}: {name!r} is a {type(labels).__name__}, expected a list of {n} integer "
            "labels."
        )
    if shape != (n,):
        raise DataError(
            f"{where}: {name!r} has shape {shape}, expected ({n},), one label per image."
        )
    bad = [i for i, value in enumerate(values) if not 0 <= value < fmt.num_classes]
    if bad:
        raise DataError(
            f"{where}: label {_number(int(values[bad[0]]))} out of range "
            f"0..{fmt.num_classes - 1} for {fmt.title} (at position {bad[0]}; {len(bad)} bad "
            "labels)."
        )
    return np.array(values, dtype=np.int64)


def _parse_batch(
    obj: Any, where: str, fmt: CifarFormat, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one batch dict (from a file of ``size`` bytes); return uint8 images
    (N, 3, 32, 32) and int64 labels (N,)."""
    label_name = fmt.label_key.decode()
    if not isinstance(obj, dict):
        raise DataError(
            f"{where} is not a {fmt.title} batch: expected a dict with keys 'data' and "
            f"{label_name!r}, found {type(obj).__name__}."
        )
    data, labels = _get(obj, b"data"), _get(obj, fmt.label_key)
    for key, value in (("data", data), (label_name, labels)):
        if value is _MISSING:
            raise DataError(f"{where} has no {key!r} entry; is it a {fmt.title} batch file?")
    if not isinstance(data, np.ndarray):
        raise DataError(
            f"{where}: 'data' is a {type(data).__name__}, expected a uint8 numpy array of shape "
            "(N, 3072) (N images of 3x32x32, channel-major)."
        )
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{where}: 'data' has shape {data.shape}, expected (N, 3072) "
            "(N images of 3x32x32, channel-major)."
        )
    if data.dtype != np.uint8:
        raise DataError(f"{where}: 'data' has dtype {data.dtype}, expected uint8.")
    if not len(data):
        raise DataError(f"{where}: 'data' holds no images.")
    if data.nbytes > size:  # the unpickler already ensures this; never trust one check alone
        raise DataError(
            f"{where}: 'data' declares {len(data)} images ({data.nbytes} bytes), but the file "
            f"has only {size} bytes."
        )
    labels = _check_labels(labels, len(data), where, fmt)
    return data.reshape(-1, 3, 32, 32), labels


def read_batch(data: bytes, where: str, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle and check one batch file's bytes: (uint8 (N, 3, 32, 32), int64 (N,))."""
    return _parse_batch(load_pickle(data, where), where, fmt, len(data))


def _class_names(obj: Any, where: str, fmt: CifarFormat) -> tuple[str, ...]:
    """The class names of a meta file: ``num_classes`` printable UTF-8 strings."""
    key = fmt.names_key.decode()
    hint = f"The file only names the classes: delete it, or download {URL} again."
    names = _get(obj, fmt.names_key) if isinstance(obj, dict) else _MISSING
    if names is _MISSING:
        raise DataError(f"{where} has no {key!r} entry; is it the {fmt.title} meta file? {hint}")
    if not isinstance(names, (list, tuple)) or len(names) != fmt.num_classes:
        if isinstance(names, (list, tuple)):
            what = f"{len(names)} entries"
        else:
            what = f"a {type(names).__name__}"
        raise DataError(
            f"{where}: {key!r} has {what}, expected a list of {fmt.num_classes} class names. "
            + hint
        )
    found = []
    for i, name in enumerate(names):
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: {key!r}[{i}] is not UTF-8 text (byte 0x{name[exc.start]:02x} at "
                    f"offset {exc.start}). {hint}"
                ) from None
        if not isinstance(name, str):
            raise DataError(f"{where}: {key!r}[{i}] is a {type(name).__name__}, not text. {hint}")
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise DataError(
                f"{where}: {key!r}[{i}] = {name[:40]!r} is not a printable class name of 1 to "
                f"{MAX_NAME_CHARS} characters. {hint}"
            )
        found.append(name)
    return tuple(found)


def read_meta(data: bytes, where: str, fmt: CifarFormat) -> tuple[str, ...]:
    """Unpickle and check a meta file's bytes: the class names."""
    return _class_names(load_pickle(data, where), where, fmt)


def _too_big(where: str | Path, size: int) -> DataError:
    return DataError(f"{where} is {size} bytes, more than {_TOO_BIG}")


_TOO_BIG = (
    f"any CIFAR file ({MAX_FILE_BYTES} bytes at most); it is not an official file. "
    f"Download {URL} again."
)


def _read_file(path: Path) -> bytes:
    """A file's bytes, refusing oversized ones before reading them."""
    return read_bounded(path, MAX_FILE_BYTES, _TOO_BIG)


def _folder_files(folder: Path, fmt: CifarFormat) -> dict[str, tuple[Path | bytes, str]]:
    """Where each file of the release is (the meta file only if present); nothing read yet."""
    found: dict[str, tuple[Path | bytes, str]] = {}
    for name in (*fmt.train_files, fmt.test_file):
        path = folder / name
        if not path.is_file():
            raise DataError(f"missing {fmt.title} batch file {path}. Download {URL} again.")
        found[name] = (path, str(path))
    meta = folder / fmt.meta_file
    if meta.is_file():
        found[fmt.meta_file] = (meta, str(meta))
    return found


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname[:100]!r}"
    if member.islnk():
        return f"a hard link to {member.linkname[:100]!r}"
    if member.issparse():
        return "a sparse file"
    return "a directory" if member.isdir() else "a special file"


def _read_archive(archive: Path, fmt: CifarFormat) -> dict[str, tuple[Path | bytes, str]]:
    """The release's files read straight from the archive, which is never extracted.

    Only regular members are read (links are refused, not followed), and a member's declared
    size is checked before it is read, so a small archive cannot expand into memory without
    bound.
    """
    required = (*fmt.train_files, fmt.test_file)
    wanted = {f"{fmt.folder}/{name}": name for name in (*required, fmt.meta_file)}
    raw: dict[str, tuple[Path | bytes, str]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in wanted:
                    continue
                where = f"{archive}:{name}"
                if not member.isreg() or member.issparse():
                    raise DataError(
                        f"{where} is {_member_kind(member)}, not a regular file; refusing to "
                        f"follow it. Download {URL} again."
                    )
                if member.size > MAX_FILE_BYTES:
                    raise _too_big(where, member.size)
                stream = tar.extractfile(member)
                if stream is not None:
                    raw[wanted[name]] = (stream.read(), where)  # at most member.size
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
    return raw


def read_cifar(
    root: str | os.PathLike[str] | None, fmt: CifarFormat
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Train images/labels, test images/labels and class names from ``root``.

    ``root`` may hold the extracted folder or the archive, or be the extracted folder itself.
    Class names are indices when the (optional) meta file is absent.
    """
    expected = f"{fmt.folder}/ or {fmt.archive}"
    root = resolve_root(root, fmt.name, expected)
    if (root / fmt.folder).is_dir():
        files = _folder_files(root / fmt.folder, fmt)
    elif root.name == fmt.folder or (root / fmt.test_file).is_file():
        files = _folder_files(root, fmt)
    elif (root / fmt.archive).is_file():
        files = _read_archive(root / fmt.archive, fmt)
    else:
        raise DataError(
            f"no {fmt.title} data in {root}: expected {expected} in {root} "
            f"(the python version from {URL})."
        )

    def take(name: str) -> tuple[bytes, str]:
        """One file's bytes, read (or released) only when it is parsed, to bound memory."""
        source, where = files.pop(name)
        return (_read_file(source) if isinstance(source, Path) else source), where

    train = [read_batch(*take(n), fmt) for n in fmt.train_files]
    test_x, test_y = read_batch(*take(fmt.test_file), fmt)
    names = (
        read_meta(*take(fmt.meta_file), fmt)
        if fmt.meta_file in files
        else tuple(str(i) for i in range(fmt.num_classes))
    )
    train_x = np.concatenate([x for x, _ in train])  # a writable copy, safe for torch
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, np.ascontiguousarray(test_x).copy(), test_y, names


def load_cifar_splits(
    name: str, root: str | os.PathLike[str] | None, options: SplitOptions
) -> Splits:
    """(train, val, test, spec); val is a stratified ``val_fraction`` of the official train set.

    The split depends on ``split_seed`` only, so runs with different ``seed`` share it.
    """
    fmt = FORMATS[name]
    options.check()
    train_x, train_y, test_x, test_y, names = read_cifar(root, fmt)
    val_idx, train_idx = options.partition(train_y)
    eval_tf = Pipeline(mean=fmt.mean, std=fmt.std)
    train_tf = Pipeline([PadRandomCrop(32, 4), RandomHorizontalFlip()], fmt.mean, fmt.std)
    spec = DataSpec(fmt.name, fmt.num_classes, 3, (32, 32), names)
    train, test = ArraySource(train_x, train_y), ArraySource(test_x, test_y)
    return options.assemble(train, test, (train_idx, val_idx), (train_tf, eval_tf), spec)
