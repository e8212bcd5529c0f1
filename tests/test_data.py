"""Tests for eigendamage.data: every format is written in its real layout into tmp_path."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from eigendamage.data import (
    DATASETS,
    DataSpec,
    canonical_name,
    get_datasets,
    make_loaders,
    stratified_partition,
)
from eigendamage.data.common import ArraySource, ImageDataset, reseed_worker
from eigendamage.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from eigendamage.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers

CIFAR_LAYOUT = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test="test_batch",
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test="test",
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        classes=100,
    ),
}


def _batch(n: int, classes: int, label_key: bytes, seed: int) -> dict:
    """One batch dict in the official layout (bytes keys, uint8 (N, 3072), list of labels)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes)[rng.permutation(n)]
    return {
        b"batch_label": b"testing batch",
        label_key: [int(v) for v in labels],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar(
    root: Path,
    name: str = "cifar10",
    *,
    n: int = 20,
    archive: bool = False,
    skip: tuple[str, ...] = (),
    replace: dict[str, bytes] | None = None,
) -> dict[str, dict]:
    """Write a small CIFAR release (folder or .tar.gz) and return the batch dicts by file."""
    lay = CIFAR_LAYOUT[name]
    n_train = n if name == "cifar10" else 5 * n
    batches = {
        f: _batch(n_train, lay["classes"], lay["label_key"], i) for i, f in enumerate(lay["train"])
    }
    batches[lay["test"]] = _batch(n, lay["classes"], lay["label_key"], 99)
    meta = {lay["names_key"]: [f"class{i}".encode() for i in range(lay["classes"])]}
    files = {f: pickle.dumps(b, protocol=2) for f, b in batches.items()}
    files[lay["meta"]] = pickle.dumps(meta, protocol=2)
    files.update(replace or {})
    for f in skip:
        files.pop(f)
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / lay["archive"], "w:gz") as tar:
            for fname, data in files.items():
                info = tarfile.TarInfo(f"{lay['folder']}/{fname}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        folder = root / lay["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
    return batches


def cifar_train_arrays(batches: dict, name: str = "cifar10") -> tuple[np.ndarray, np.ndarray]:
    lay = CIFAR_LAYOUT[name]
    x = np.concatenate([batches[f][b"data"] for f in lay["train"]]).reshape(-1, 3, 32, 32)
    y = np.concatenate([batches[f][lay["label_key"]] for f in lay["train"]])
    return x, y


def write_image(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB", seed: int = 0):
    """A random image file of ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, as in the official wnids.txt


def write_tiny(root: Path, *, per_class: int = 4, val_per_class: int = 2) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish\nn02\ttabby cat\nn99\tunused\n")
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", seed=10 * c + i)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    k = 0
    for wnid in WNIDS:
        for _ in range(val_per_class):
            fname = f"val_{k}.JPEG"
            write_image(base / "val" / "images" / fname, seed=100 + k)
            lines.append(f"{fname}\t{wnid}\t0\t0\t63\t63")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_imagefolder(
    root: Path, classes=("cat", "dog", "emu"), splits=("train",), per_class: int = 5
) -> None:
    sizes = [(40, 50), (60, 30), (33, 33)]
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                ext = ".png" if i % 2 else ".jpg"
                write_image(root / split / name / f"{i}{ext}", size=sizes[i % 3], seed=100 * c + i)


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


# --------------------------------------------------------------------------- registry


def test_unknown_dataset_name_is_config_error_with_hint():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar11'.*'cifar10'"):
        get_datasets("cifar11")
    with pytest.raises(ConfigError, match="unknown dataset"):
        make_loaders("svhn")


def test_dataset_name_aliases():
    assert canonical_name("CIFAR_10") == "cifar10"
    assert canonical_name("Tiny_ImageNet") == "tiny-imagenet"
    assert canonical_name("FMNIST") == "fashion-mnist"
    assert set(DATASETS) == {
        "digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder",
        "mnist", "fashion-mnist", "idx",
    }  # fmt: skip


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny-imagenet", "imagefolder"])
def test_root_none_asks_for_data_root(name):
    with pytest.raises(DataError, match="--data-root"):
        get_datasets(name, None)


@pytest.mark.parametrize("name", ["cifar10", "tiny-imagenet", "imagefolder"])
def test_missing_root_names_it(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        get_datasets(name, missing)
    assert str(missing) in str(err.value)


def test_image_size_only_for_imagefolder():
    with pytest.raises(ConfigError, match="image_size"):
        get_datasets("digits", image_size=32)


def test_bad_loader_options_are_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        make_loaders("digits", batch_size=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        get_datasets("cifar10", "/tmp", val_fraction=1.5)


# --------------------------------------------------------------------------- splits


def test_stratified_partition_exact_and_balanced():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    val, test, train = stratified_partition(labels, [0.2, 0.1], seed=3)
    assert (len(val), len(test), len(train)) == (20, 10, 70)
    allidx = np.concatenate([val, test, train])
    assert sorted(allidx) == list(range(100))
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [10, 6, 3, 1])
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=4), [5, 3, 1, 1])
    again = stratified_partition(labels, [0.2, 0.1], seed=3)
    other = stratified_partition(labels, [0.2, 0.1], seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(again, (val, test, train), strict=True))
    assert not np.array_equal(other[0], val)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=2, max_size=200),
    frac=st.floats(0.0, 0.45),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_partition_properties(labels, frac, seed):
    n = len(labels)
    if 2 * round(n * frac) >= n:
        with pytest.raises(DataError):
            stratified_partition(labels, [frac, frac], seed)
        return
    a, b, rest = stratified_partition(labels, [frac, frac], seed)
    assert len(a) == len(b) == round(n * frac)
    joined = np.concatenate([a, b, rest])
    assert len(np.unique(joined)) == n == len(joined)


# --------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_split():
    train, val, test, spec = get_datasets("digits")
    assert spec == DataSpec("digits", 10, 1, (8, 8), tuple("0123456789"))
    assert spec.input_shape == (1, 8, 8)
    sizes = (len(train), len(val), len(test))
    assert sum(sizes) == 1797 and sizes == (1079, 359, 359)
    idx = [set(d.indices.tolist()) for d in (train, val, test)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    for d in (val, test):  # stratified: about 36 of each digit
        counts = np.bincount(d.targets, minlength=10)
        assert counts.min() >= 34 and counts.max() <= 38
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10
    stacked = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(stacked.mean())) < 1e-4 and abs(float(stacked.std()) - 1) < 1e-2
    # The split never depends on the run seed.
    train5, val5, test5, _ = get_datasets("digits", seed=5)
    np.testing.assert_array_equal(test5.indices, test.indices)
    np.testing.assert_array_equal(val5.indices, val.indices)


def test_digits_loader_reproducible_per_seed():
    a = first_batch(make_loaders("digits", batch_size=32, seed=0).train)
    b = first_batch(make_loaders("digits", batch_size=32, seed=0).train)
    c = first_batch(make_loaders("digits", batch_size=32, seed=1).train)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    loaders = make_loaders("digits", batch_size=32, eval_batch_size=100)
    assert loaders.val.batch_size == 100 and loaders.train.batch_size == 32
    v1, v2 = first_batch(loaders.val), first_batch(loaders.val)
    assert torch.equal(v1[0], v2[0])


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("archive", [False, True])
def test_cifar10_splits_shapes_and_values(tmp_path, archive):
    batches = write_cifar(tmp_path, archive=archive)
    train, val, test, spec = get_datasets("cifar10", tmp_path, val_fraction=0.1)
    assert spec.num_classes == 10 and spec.input_shape == (3, 32, 32)
    assert spec.classes == tuple(f"class{i}" for i in range(10))
    assert (len(train), len(val), len(test)) == (90, 10, 20)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert np.bincount(val.targets, minlength=10).tolist() == [1] * 10  # stratified
    x_raw, y_raw = cifar_train_arrays(batches)
    # Val is the eval transform of the exact raw pixels (checks channel-major parsing too).
    for i in (0, 5):
        x, y = val[i]
        j = val.indices[i]
        assert y == y_raw[j]
        torch.testing.assert_close(x, _cifar_eval(x_raw[j]))
    tx, ty = test[3]
    assert tx.shape == (3, 32, 32) and ty == batches["test_batch"][b"labels"][3]
    assert all(0 <= train[i][1] < 10 for i in range(len(train)))


def test_cifar_archive_and_folder_agree_and_root_can_be_folder(tmp_path):
    write_cifar(tmp_path / "a", archive=True)
    write_cifar(tmp_path / "b", archive=False)
    a = get_datasets("cifar10", tmp_path / "a", augment=False)
    b = get_datasets("cifar10", tmp_path / "b" / "cifar-10-batches-py", augment=False)
    for da, db in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(da.indices, db.indices)
        assert torch.equal(da[1][0], db[1][0])


@pytest.mark.parametrize("archive", [False, True])
def test_cifar100_fine_labels(tmp_path, archive):
    batches = write_cifar(tmp_path, "cifar100", archive=archive)
    train, val, test, spec = get_datasets("cifar100", tmp_path)
    assert spec.num_classes == 100 and spec.classes[7] == "class7"
    assert (len(train) + len(val), len(val), len(test)) == (100, 10, 20)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train.targets, val.targets])), np.arange(100)
    )
    assert test.targets.tolist() == batches["test"][b"fine_labels"]


def _cifar_eval(raw: np.ndarray) -> torch.Tensor:
    """The expected eval transform of one raw uint8 (3, 32, 32) CIFAR-10 image."""
    mean = torch.tensor(CIFAR10_MEAN)[:, None, None]
    std = torch.tensor(CIFAR10_STD)[:, None, None]
    return (torch.from_numpy(raw).float() / 255 - mean) / std


def test_cifar_augmentation_train_only(tmp_path):
    batches = write_cifar(tmp_path)
    x_raw, _ = cifar_train_arrays(batches)
    train, val, test, _ = get_datasets("cifar10", tmp_path, seed=0)
    j = int(train.indices[0])
    draws = [train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # Each draw is a 32x32 window of the zero-padded (possibly mirrored) image.
    padded = torch.nn.functional.pad(torch.from_numpy(x_raw[j]), (4, 4, 4, 4))
    windows = [
        _cifar_eval(img[:, t : t + 32, s : s + 32].numpy())
        for img in (padded, padded.flip(-1))
        for t in range(9)
        for s in range(9)
    ]
    for d in draws:
        assert any(torch.allclose(d, w) for w in windows)
    # Val and test use the eval transform only, and so does train with augment=False.
    for ds in (val, test):
        assert torch.equal(ds[2][0], ds[2][0])
    torch.testing.assert_close(val[2][0], _cifar_eval(x_raw[val.indices[2]]))
    plain = get_datasets("cifar10", tmp_path, augment=False)[0]
    torch.testing.assert_close(plain[0][0], _cifar_eval(x_raw[j]))


def test_cifar_meta_is_optional(tmp_path):
    write_cifar(tmp_path, skip=("batches.meta",))
    spec = get_datasets("cifar10", tmp_path)[3]
    assert spec.classes == tuple(str(i) for i in range(10))


def test_cifar_split_depends_on_split_seed_only(tmp_path):
    write_cifar(tmp_path)
    v0 = get_datasets("cifar10", tmp_path, seed=0)[1].indices
    v1 = get_datasets("cifar10", tmp_path, seed=1)[1].indices
    v2 = get_datasets("cifar10", tmp_path, seed=0, split_seed=7)[1].indices
    np.testing.assert_array_equal(v0, v1)
    assert not np.array_equal(v0, v2)


@pytest.mark.parametrize("workers", [0, 2])
def test_cifar_loader_reproducible(tmp_path, workers):
    write_cifar(tmp_path)
    kw = dict(batch_size=16, num_workers=workers)
    a = first_batch(make_loaders("cifar10", tmp_path, seed=0, **kw).train)
    b = first_batch(make_loaders("cifar10", tmp_path, seed=0, **kw).train)
    c = first_batch(make_loaders("cifar10", tmp_path, seed=1, **kw).train)
    assert a[0].shape == (16, 3, 32, 32) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # order and augmentation
    assert not torch.equal(a[0], c[0])


def test_cifar_no_layout(tmp_path):
    with pytest.raises(DataError) as err:
        get_datasets("cifar10", tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-py/ or cifar-10-python.tar.gz" in msg and str(tmp_path) in msg
    with pytest.raises(DataError, match="cifar-100-python/ or cifar-100-python.tar.gz"):
        get_datasets("cifar100", tmp_path)


def test_cifar_missing_batch_file(tmp_path):
    write_cifar(tmp_path, skip=("data_batch_3",))
    with pytest.raises(DataError, match="missing CIFAR-10 batch file .*data_batch_3"):
        get_datasets("cifar10", tmp_path)


def test_cifar_archive_missing_member(tmp_path):
    write_cifar(tmp_path, archive=True, skip=("data_batch_5",))
    with pytest.raises(DataError, match="cifar-10-batches-py/data_batch_5") as err:
        get_datasets("cifar10", tmp_path)
    assert "cifar-10-python.tar.gz" in str(err.value)


def test_cifar_truncated_pickle(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt or truncated pickle") as err:
        get_datasets("cifar10", tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_cifar_corrupt_archive(tmp_path, damage):
    write_cifar(tmp_path, archive=True)
    path = tmp_path / "cifar-10-python.tar.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00junk" * 100)
    with pytest.raises(DataError) as err:
        get_datasets("cifar10", tmp_path)
    assert str(path) in str(err.value)


def _bad_batch(**changes) -> bytes:
    batch = _batch(20, 10, b"labels", 1)
    batch.update({k.encode(): v for k, v in changes.items()})
    return pickle.dumps(batch, protocol=2)


@pytest.mark.parametrize(
    ("replacement", "pattern"),
    [
        (_bad_batch(labels=[10] + [0] * 19), r"label 10 out of range 0\.\.9"),
        (_bad_batch(labels=[-1] + [0] * 19), r"label -1 out of range"),
        (_bad_batch(labels=[0] * 19), r"expected \(20,\)"),
        (_bad_batch(data=np.zeros((20, 3000), np.uint8)), r"shape \(20, 3000\)"),
        (_bad_batch(data=np.zeros((20, 3072), np.int64)), "dtype int64"),
        (pickle.dumps([1, 2, 3], protocol=2), "not a CIFAR-10 batch"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "no 'labels'"),
    ],
)
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_bad_batch_contents(tmp_path, replacement, pattern, archive):
    write_cifar(tmp_path, archive=archive, replace={"data_batch_4": replacement})
    with pytest.raises(DataError, match=pattern) as err:
        get_datasets("cifar10", tmp_path)
    assert "data_batch_4" in str(err.value)


class _Exploit:
    """Pickles to a call of os.system: loading it with plain pickle would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2)
    write_cifar(tmp_path, replace={"data_batch_1": evil})
    with pytest.raises(DataError, match=r"refusing to unpickle .*data_batch_1.*system") as err:
        get_datasets("cifar10", tmp_path)
    assert not marker.exists()
    assert "system" in str(err.value)
    evil_eval = pickle.dumps({b"data": _EvalExploit()}, protocol=4)
    write_cifar(tmp_path, archive=True, replace={"test_batch": evil_eval})
    (tmp_path / "cifar-10-batches-py").rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"builtins\.eval"):
        get_datasets("cifar10", tmp_path)


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_cifar_python2_style_pickle_loads(tmp_path):
    """Official files name numpy.core.multiarray (numpy 1.x); that must still load."""
    batches = write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    data = path.read_bytes()
    if b"numpy._core.multiarray" in data:  # numpy 2 writes the new name; emulate the old one
        path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    train, val, _, _ = get_datasets("cifar10", tmp_path, augment=False)
    x_raw, _ = cifar_train_arrays(batches)
    ds = train if 0 in train.indices else val
    i = int(np.flatnonzero(ds.indices == 0)[0])
    torch.testing.assert_close(ds[i][0], _cifar_eval(x_raw[0]))


def test_workers_get_distinct_augmentation_streams():
    """Without reseeding, every worker would replay the same copy of the generator."""
    source = ArraySource(np.zeros((4, 1, 2, 2), np.float32), np.zeros(4, np.int64))
    ds = ImageDataset(source, np.arange(4), lambda img, g: torch.rand(1, generator=g), seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=1, num_workers=2, worker_init_fn=reseed_worker
    )
    first, second = (float(x) for x, _ in list(loader)[:2])  # worker 0, worker 1
    assert first != second
    gen = torch.Generator().manual_seed(0)
    assert float(ds[0][0]) == float(torch.rand(1, generator=gen))  # main process: from seed


# --------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_layout(tmp_path):
    base = write_tiny(tmp_path)
    train, val, test, spec = get_datasets("tiny-imagenet", tmp_path)
    assert spec.num_classes == 3 and spec.input_shape == (3, 64, 64)
    assert spec.classes == ("goldfish", "tabby cat", "n03")  # sorted wnids, words.txt names
    assert (len(train), len(val), len(test)) == (11, 1, 6)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    # test = official val set, labelled by val_annotations.txt in sorted-wnid order
    assert test.targets.tolist() == [1, 1, 0, 0, 2, 2]
    x, y = test[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 1
    assert torch.equal(test[0][0], test[0][0]) and torch.equal(val[0][0], val[0][0])
    draws = [train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # Train labels follow the folder they came from.
    for i in range(len(train)):
        path = train.source.paths[train.indices[i]]
        assert WNIDS.index(path.parent.parent.name) == [1, 0, 2][train[i][1]]
    # root may also be the tiny-imagenet-200 folder itself
    again = get_datasets("tiny-imagenet", base)
    np.testing.assert_array_equal(again[0].indices, train.indices)


def test_tiny_imagenet_grayscale_and_odd_size_images(tmp_path):
    base = write_tiny(tmp_path)
    write_image(base / "train" / "n01" / "images" / "n01_0.JPEG", mode="L")
    write_image(base / "val" / "images" / "val_2.JPEG", size=(50, 70))
    train, _, test, _ = get_datasets("tiny-imagenet", tmp_path, augment=False, val_fraction=0.0)
    assert len(train) == 12
    assert train[0][0].shape == (3, 64, 64)  # first sorted sample is n01_0, grayscale
    assert test[2][0].shape == (3, 64, 64)


def test_tiny_imagenet_malformed_annotation_line(tmp_path):
    base = write_tiny(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[2] = "val_2.JPEG n01 0 0 63 63"  # spaces, not tabs
    ann.write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 3: malformed") as err:
        get_datasets("tiny-imagenet", tmp_path)
    assert str(ann) in str(err.value)


def test_tiny_imagenet_annotation_unknown_wnid_and_missing_image(tmp_path):
    base = write_tiny(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_0.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 7: class 'n77' is not listed in wnids.txt"):
        get_datasets("tiny-imagenet", tmp_path)
    ann.write_text(good + "ghost.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 7: image .*ghost\.JPEG does not exist"):
        get_datasets("tiny-imagenet", tmp_path)


def test_tiny_imagenet_layout_errors(tmp_path):
    with pytest.raises(DataError, match="expected tiny-imagenet-200/") as err:
        get_datasets("tiny-imagenet", tmp_path)
    assert str(tmp_path) in str(err.value)
    base = write_tiny(tmp_path)
    for f in (base / "train" / "n03" / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*n03.* has no images"):
        get_datasets("tiny-imagenet", tmp_path)
    (base / "wnids.txt").write_text("n01\nn02\nn04\n")
    with pytest.raises(DataError, match=r"missing class folder .*n04"):
        get_datasets("tiny-imagenet", tmp_path)
    (base / "wnids.txt").unlink()
    with pytest.raises(DataError, match="wnids.txt"):
        get_datasets("tiny-imagenet", tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_names_file(tmp_path, damage):
    base = write_tiny(tmp_path)
    bad = base / "val" / "images" / "val_1.JPEG"
    if damage == "garbage":
        bad.write_bytes(b"this is not a jpeg")
    else:
        bad.write_bytes(bad.read_bytes()[:300])
    _, _, test, _ = get_datasets("tiny-imagenet", tmp_path)
    test[0]  # a good file still loads
    with pytest.raises(DataError, match="cannot read image file") as err:
        test[1]
    assert str(bad) in str(err.value)
    loader = make_loaders("tiny-imagenet", tmp_path, batch_size=4).test
    with pytest.raises(DataError, match="val_1.JPEG"):
        list(loader)


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_all_splits(tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val", "test"), per_class=4)
    train, val, test, spec = get_datasets("imagefolder", tmp_path, image_size=32)
    assert spec == DataSpec("imagefolder", 3, 3, (32, 32), ("cat", "dog", "emu"))
    assert (len(train), len(val), len(test)) == (12, 12, 12)
    for ds in (train, val, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and 0 <= y < 3
    assert sorted(test.targets.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(val[3][0], val[3][0]) and torch.equal(test[3][0], test[3][0])
    draws = [train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = get_datasets("imagefolder", tmp_path, image_size=32, augment=False)[0]
    assert torch.equal(plain[0][0], plain[0][0])


def test_imagefolder_default_size_and_split_from_train(tmp_path):
    write_imagefolder(tmp_path, per_class=10)
    train, val, test, spec = get_datasets("imagefolder", tmp_path, val_fraction=0.2)
    assert spec.image_size == (224, 224)
    assert (len(train), len(val), len(test)) == (18, 6, 6)
    parts = [set(d.indices.tolist()) for d in (train, val, test)]
    assert set().union(*parts) == set(range(30)) and sum(map(len, parts)) == 30
    assert np.bincount(val.targets).tolist() == [2, 2, 2]
    assert val[0][0].shape == (3, 224, 224)


def test_imagefolder_only_test_missing(tmp_path):
    write_imagefolder(tmp_path, splits=("train", "val"), per_class=10)
    train, val, test, _ = get_datasets("imagefolder", tmp_path, image_size=16)
    assert (len(train), len(val), len(test)) == (27, 30, 3)
    assert test.source is train.source and val.source is not train.source


def test_imagefolder_class_mismatch(tmp_path):
    write_imagefolder(tmp_path)
    write_imagefolder(tmp_path, classes=("cat", "dog", "yak"), splits=("val",), per_class=1)
    with pytest.raises(DataError, match=r"missing \['emu'\], extra \['yak'\]") as err:
        get_datasets("imagefolder", tmp_path)
    assert str(tmp_path / "val") in str(err.value)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="expected .*train/<class>/<images>"):
        get_datasets("imagefolder", tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders in"):
        get_datasets("imagefolder", tmp_path)
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "gnu").mkdir()
    (tmp_path / "train" / "gnu" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*gnu has no images"):
        get_datasets("imagefolder", tmp_path)


def test_imagefolder_root_is_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        get_datasets("imagefolder", f)
