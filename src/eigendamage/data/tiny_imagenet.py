"""Tiny-ImageNet (200 classes, 64x64 RGB) from its official folder layout.

The official validation images have labels and the test images do not, so the official
val set serves as our TEST set and a stratified 10% of train as our validation set.
Class indices follow the sorted wnids (the order ``ImageFolder`` on ``train/`` would give).
"""

from __future__ import annotations

import os
from pathlib import Path

from eigendamage.errors import DataError

from .common import (
    IMAGE_EXTENSIONS,
    DataSpec,
    FileSource,
    SplitOptions,
    Splits,
    read_bounded,
    resolve_root,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FitSize,
    PadRandomCrop,
    Pipeline,
    RandomHorizontalFlip,
)

FOLDER = "tiny-imagenet-200"
SIZE = (64, 64)
#: Largest text file read (the official words.txt, the biggest, is 2.6 MB).
MAX_TEXT_BYTES = 64 * 2**20


def _find(root: Path) -> Path:
    if (root / "wnids.txt").is_file():
        return root
    if (root / FOLDER).is_dir():
        base = root / FOLDER
        if not (base / "wnids.txt").is_file():
            raise DataError(f"missing {base / 'wnids.txt'} (the list of Tiny-ImageNet classes).")
        return base
    raise DataError(
        f"no Tiny-ImageNet data in {root}: expected {FOLDER}/ (with wnids.txt, train/, val/) "
        "there, or pass that folder itself as the data root."
    )


def _short(text: str, limit: int = 80) -> str:
    """Text from a file, fit for a one-line message: as is if short and printable, else a
    clipped repr (a 100 MB line or a terminal escape must not reach the terminal)."""
    if len(text) <= limit and text.isprintable():
        return text
    return _quoted(text, limit)


def _quoted(text: str, limit: int = 80) -> str:
    """``repr`` of text from a file, clipped to ``limit`` characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _read_text(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, refusing oversized files before reading them."""
    raw = read_bounded(
        path,
        MAX_TEXT_BYTES,
        f"a Tiny-ImageNet text file can be ({MAX_TEXT_BYTES} bytes at most); it is not the "
        "official file.",
    )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}). Download the dataset again."
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _check_wnid(wnid: str, path: Path, number: int) -> None:
    """A class id names a folder under train/: one plain path component, nothing more."""
    if (
        len(wnid) > 255
        or not wnid.isprintable()
        or wnid in (".", "..")
        or "/" in wnid
        or "\\" in wnid
    ):
        raise DataError(
            f"{path}, line {number}: {_quoted(wnid)} is not a class id (a folder name under "
            "train/, such as n01443537)."
        )


def _wnids(base: Path) -> list[str]:
    path = base / "wnids.txt"
    wnids: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(_read_text(path), start=1):
        wnid = line.strip()
        if not wnid:
            continue
        _check_wnid(wnid, path, number)
        if wnid in seen:
            raise DataError(f"{path} lists class {wnid} twice (again on line {number}).")
        seen.add(wnid)
        wnids.append(wnid)
    if not wnids:
        raise DataError(f"{path} lists no classes.")
    return sorted(wnids)


def _words(base: Path, wnids: list[str]) -> tuple[str, ...]:
    """Human-readable class names from the optional words.txt; the wnid where absent."""
    path = base / "words.txt"
    words: dict[str, str] = {}
    if path.is_file():
        for line in _read_text(path):
            wnid, _, text = line.partition("\t")
            if text:
                words[wnid.strip()] = text.strip()
    return tuple(words.get(w, w) for w in wnids)


def _images_in(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted(
            Path(e.path)
            for e in entries
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )


def _train_files(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    train = base / "train"
    if not train.is_dir():
        raise DataError(f"missing folder {train} (expected train/<wnid>/images/*.JPEG).")
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = train / wnid / "images"
        if not folder.is_dir():
            folder = train / wnid  # tolerate images placed directly in the class folder
        if not folder.is_dir():
            raise DataError(f"missing class folder {train / wnid} (listed in wnids.txt).")
        files = _images_in(folder)
        if not files:
            raise DataError(f"class folder {folder} has no images.")
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels


def _val_files(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    images = base / "val" / "images"
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"missing {annotations} (labels of the Tiny-ImageNet val images).")
    if not images.is_dir():
        raise DataError(f"missing folder {images} (the Tiny-ImageNet val images).")
    present = {p.name for p in _images_in(images)}
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for number, line in enumerate(_read_text(annotations), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(
                f"{annotations}, line {number}: malformed line {_quoted(line)}; expected "
                "tab-separated 'filename, wnid, x, y, w, h'."
            )
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(
                f"{annotations}, line {number}: class {_quoted(wnid)} is not listed in wnids.txt."
            )
        if name not in present:
            raise DataError(
                f"{annotations}, line {number}: image {images}/{_short(name)} does not exist."
            )
        paths.append(images / name)
        labels.append(index[wnid])
    if not paths:
        raise DataError(f"{annotations} lists no images.")
    return paths, labels


def load_tiny_imagenet_splits(root: str | os.PathLike[str] | None, options: SplitOptions) -> Splits:
    """(train, val, test, spec) with test = official val set, val = seeded 10% of train."""
    options.check()
    base = _find(resolve_root(root, "tiny-imagenet", f"{FOLDER}/"))
    wnids = _wnids(base)
    train_paths, train_labels = _train_files(base, wnids)
    test_paths, test_labels = _val_files(base, wnids)
    val_idx, train_idx = options.partition(train_labels)
    eval_tf = Pipeline([FitSize(SIZE)], IMAGENET_MEAN, IMAGENET_STD)
    train_tf = Pipeline(
        [FitSize(SIZE), PadRandomCrop(SIZE[0], 4), RandomHorizontalFlip()],
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    spec = DataSpec("tiny-imagenet", len(wnids), 3, SIZE, _words(base, wnids))
    train, test = FileSource(train_paths, train_labels), FileSource(test_paths, test_labels)
    return options.assemble(train, test, (train_idx, val_idx), (train_tf, eval_tf), spec)
