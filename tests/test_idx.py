"""IDX datasets (MNIST, Fashion-MNIST, any IDX folder) and the paper's models at 28x28.

Every file here is written in the real IDX format (magic number, big-endian dimensions),
raw and gzipped, so the reader is tested on the bytes it will meet, and every malformed
variant must be one DataError naming the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eigendamage.cli import main
from eigendamage.data import canonical_name, get_datasets, make_loaders
from eigendamage.data import idx as idx_mod
from eigendamage.data.idx import FILES, MAX_DATA_BYTES, read_idx
from eigendamage.data.transforms import PadRandomCrop, RandomHorizontalFlip
from eigendamage.errors import DataError, ModelError
from eigendamage.io import input_shape_of as default_input_shape
from eigendamage.io import load_model, save_model
from eigendamage.measure import count
from eigendamage.models import create_model, list_models

TRAIN_X, TRAIN_Y, TEST_X, TEST_Y = FILES


def header(dims: tuple[int, ...], code: int = 0x08, zeros: bytes = b"\0\0") -> bytes:
    """An IDX header: two zero bytes, type code, number of dims, dims as big-endian uint32."""
    return zeros + bytes([code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def idx_bytes(values: np.ndarray) -> bytes:
    return header(values.shape) + values.astype(np.uint8).tobytes()


def put(path: Path, data: bytes, gz: bool) -> Path:
    """Write ``data`` to ``path`` (``.gz`` appended and compressed when ``gz``)."""
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_arrays(
    n_train: int = 40, n_test: int = 20, size: tuple[int, int] = (28, 28), classes: int = 10
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        TRAIN_X: rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        TRAIN_Y: np.arange(n_train, dtype=np.uint8) % classes,
        TEST_X: rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        TEST_Y: np.arange(n_test, dtype=np.uint8) % classes,
    }


def write_idx(root: Path, gz: bool = True, **kwargs) -> dict[str, np.ndarray]:
    """A full IDX folder of random images; returns the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = make_arrays(**kwargs)
    for name, values in arrays.items():
        put(root / name, idx_bytes(values), gz)
    return arrays


def replace(root: Path, name: str, data: bytes, gz: bool = True) -> Path:
    """Swap one file of a folder for ``data`` (removing both spellings first)."""
    for old in (root / name, root / f"{name}.gz"):
        old.unlink(missing_ok=True)
    return put(root / name, data, gz)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_folder_loads_shapes_labels_and_values(tmp_path, gz):
    arrays = write_idx(tmp_path, gz=gz, size=(12, 10), classes=7)
    train, val, test, spec = get_datasets("idx", tmp_path, augment=False, val_fraction=0.25)
    assert (spec.name, spec.num_classes, spec.in_channels, spec.image_size) == (
        "idx",
        7,
        1,
        (12, 10),
    )
    assert spec.classes == tuple(str(i) for i in range(7))
    assert (len(train), len(val), len(test)) == (30, 10, 20)
    assert sorted([*train.indices, *val.indices]) == list(range(40))
    source = train.source
    assert source.images.shape == (40, 1, 12, 10) and source.images.dtype == np.uint8
    np.testing.assert_array_equal(source.images[:, 0], arrays[TRAIN_X])
    np.testing.assert_array_equal(test.targets, arrays[TEST_Y])
    # normalised with the training split's own statistics
    train_pixels = arrays[TRAIN_X][train.indices] / 255.0
    image, label = test[3]
    expected = (arrays[TEST_X][3] / 255.0 - train_pixels.mean()) / train_pixels.std()
    assert image.shape == (1, 12, 10) and label == int(arrays[TEST_Y][3])
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-5)
    augmented = get_datasets("idx", tmp_path)[0]  # the crop works on non-square images
    assert augmented.transform.ops[0].size == (12, 10) and augmented[0][0].shape == (1, 12, 10)


def test_raw_and_gz_give_the_same_data_and_raw_wins(tmp_path):
    write_idx(tmp_path / "gz", gz=True)
    write_idx(tmp_path / "raw", gz=False)
    a = get_datasets("mnist", tmp_path / "gz", augment=False)
    b = get_datasets("mnist", tmp_path / "raw", augment=False)
    np.testing.assert_array_equal(a[0].source.images, b[0].source.images)
    np.testing.assert_array_equal(a[2].source.labels, b[2].source.labels)
    # a raw file beside a (broken) .gz is the one read
    (tmp_path / "raw" / f"{TEST_Y}.gz").write_bytes(b"broken")
    get_datasets("mnist", tmp_path / "raw")


def test_fashion_mnist_spec_default_root_and_augmentation(tmp_path, monkeypatch):
    write_idx(tmp_path)
    fmt = dataclasses.replace(idx_mod.FASHION_MNIST, default_root=str(tmp_path))
    monkeypatch.setitem(idx_mod.FORMATS, "fashion-mnist", fmt)
    train, val, test, spec = get_datasets("fashion-mnist")  # no root: the default folder
    assert spec.num_classes == 10 and spec.input_shape == (1, 28, 28)
    assert spec.classes[0] == "T-shirt/top" and spec.classes[-1] == "Ankle boot"
    assert len(set(spec.classes)) == 10
    assert [type(op) for op in train.transform.ops] == [PadRandomCrop, RandomHorizontalFlip]
    assert train.transform.ops[0].size == (28, 28) and train.transform.ops[0].padding == 2
    assert val.transform.ops == () and test.transform.ops == ()
    torch.testing.assert_close(val.transform.mean.flatten(), torch.tensor([0.2860]))
    torch.testing.assert_close(val.transform.std.flatten(), torch.tensor([0.3530]))
    image, _ = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert canonical_name("Fashion_MNIST") == canonical_name("fmnist") == "fashion-mnist"


def test_mnist_statistics_and_no_flip(tmp_path):
    write_idx(tmp_path)
    train, val, _, spec = get_datasets("mnist", tmp_path)
    assert spec.classes == tuple("0123456789") and spec.image_size == (28, 28)
    assert [type(op) for op in train.transform.ops] == [PadRandomCrop]
    torch.testing.assert_close(val.transform.mean.flatten(), torch.tensor([0.1307]))
    torch.testing.assert_close(val.transform.std.flatten(), torch.tensor([0.3081]))
    # the crop moves pixels: an augmented image differs from the plain one for some sample
    plain = get_datasets("mnist", tmp_path, augment=False)[0]
    assert any(not torch.equal(train[i][0], plain[i][0]) for i in range(8))


def test_seeded_split_depends_on_split_seed_only(tmp_path):
    write_idx(tmp_path, n_train=100)

    def val_of(**kwargs) -> np.ndarray:
        return get_datasets("mnist", tmp_path, **kwargs)[1].indices

    first = val_of(split_seed=3)
    assert len(first) == 10  # round(100 * 0.1)
    np.testing.assert_array_equal(first, val_of(split_seed=3, seed=99))
    assert not np.array_equal(first, val_of(split_seed=4))
    assert (
        np.bincount(get_datasets("mnist", tmp_path, split_seed=3)[1].targets).tolist() == [1] * 10
    )
    assert len(val_of(val_fraction=0.0)) == 0


def test_loaders_batch_shapes(tmp_path):
    write_idx(tmp_path, gz=False)
    loaders = make_loaders("idx", tmp_path, batch_size=8, seed=1)
    x, y = next(iter(loaders.train))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    assert loaders.spec.num_classes == 10


def test_real_fashion_mnist_if_installed():
    if not all((Path(idx_mod.FASHION_MNIST.default_root) / f"{n}.gz").is_file() for n in FILES):
        pytest.skip("dataset-fashion-mnist is not installed")
    train, val, test, spec = get_datasets("fashion-mnist", val_fraction=0.1)
    assert (len(train), len(val), len(test)) == (54_000, 6_000, 10_000)
    assert np.bincount(test.targets).tolist() == [1000] * 10
    mean, std = idx_mod.pixel_stats(train.source.images, np.arange(60_000))
    assert abs(mean - 0.2860) < 1e-3 and abs(std - 0.3530) < 1e-3


# --------------------------------------------------------------------------- bad files


images = make_arrays()[TRAIN_X]
labels = make_arrays()[TRAIN_Y]
half_gz = gzip.compress(idx_bytes(images))[:2000]  # gzipped by content, whatever the name

# (id, file to damage, bytes, gzipped?, fragments of the message)
BAD: list[tuple[str, str, bytes, bool, list[str]]] = [
    ("wrong-magic", TRAIN_X, header(images.shape, zeros=b"PK") + images.tobytes(), True,
     ["not an IDX file", "expected 0x00000803"]),
    ("float-type", TRAIN_X, header(images.shape, code=0x0D) + images.tobytes(), False,
     ["float32", "0x0d", "only unsigned bytes"]),
    ("int32-labels", TRAIN_Y, header(labels.shape, code=0x0C) + labels.tobytes(), True,
     ["int32", "only unsigned bytes"]),
    ("images-2-dims", TRAIN_X, header((40, 784)) + images.tobytes(), True,
     ["2 dimension(s)", "magic 0x00000802", "expected 0x00000803"]),
    ("labels-as-images", TRAIN_Y, idx_bytes(images), False,
     ["3 dimension(s)", "expected 0x00000801"]),
    ("short-header", TRAIN_X, b"\0\0\x08", True, ["truncated", "16-byte IDX header"]),
    ("header-without-dims", TEST_Y, header((20,))[:6], False, ["truncated", "8-byte"]),
    ("truncated-raw", TRAIN_X, idx_bytes(images)[:-5], False,
     ["truncated", "(40, 28, 28)", "31376 bytes with the header, but the file has 31371"]),
    ("too-long-raw", TEST_Y, idx_bytes(labels[:20]) + b"xx", False, ["too long"]),
    ("truncated-gz-data", TRAIN_X, idx_bytes(images)[:-5], True,
     ["declares shape (40, 28, 28)", "31360 bytes of data", "holds only 31355"]),
    ("gz-more-than-declared", TRAIN_Y, idx_bytes(labels) + b"\0" * 1000, True,
     ["holds more than that"]),
    ("zero-dimension", TRAIN_X, header((0, 28, 28)), True, ["holds no data"]),
    ("gz-bomb-huge-size", TRAIN_X, header((2**31, 2**16, 2**16)), True,
     ["more than the", str(MAX_DATA_BYTES), "not a real dataset file"]),
    ("count-mismatch", TRAIN_Y, idx_bytes(labels[:39]), True,
     ["holds 40 images but", "holds 39 labels", TRAIN_Y]),
    ("label-out-of-range", TEST_Y, idx_bytes(np.array([1, 2, 10, 11] + [0] * 16)), True,
     ["label 10 at position 2", "out of range 0..9", "(2 bad labels)"]),
    ("wrong-image-size", TEST_X, idx_bytes(np.zeros((20, 32, 32), np.uint8)), True,
     ["32x32 images", "28x28", "--data idx"]),
    ("truncated-gz-stream", TRAIN_X, half_gz, False, ["corrupt or truncated", "EOFError"]),
    ("not-gzip", TRAIN_X, b"\x1f\x8bnot really gzip", False, ["corrupt", "BadGzipFile"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "gz", "fragments"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_file_is_one_error_naming_it(tmp_path, name, data, gz, fragments):
    write_idx(tmp_path)
    path = replace(tmp_path, name, data, gz)
    with pytest.raises(DataError) as err:
        get_datasets("mnist", tmp_path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_idx_train_and_test_sizes_must_agree(tmp_path):
    write_idx(tmp_path)
    replace(tmp_path, TEST_X, idx_bytes(np.zeros((20, 14, 14), np.uint8)))
    with pytest.raises(DataError, match=r"holds 14x14 images but .*holds 28x28") as err:
        get_datasets("idx", tmp_path)
    assert TEST_X in str(err.value) and TRAIN_X in str(err.value)


class _CountingGzip(gzip.GzipFile):
    """Counts the decompressed bytes handed out, to prove a bomb is not expanded."""

    total = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        _CountingGzip.total += len(data)
        return data


def test_gz_bomb_is_not_decompressed_past_its_declared_size(tmp_path, monkeypatch):
    write_idx(tmp_path)
    bomb = header((100,)) + bytes(64 * 2**20)  # declares 100 labels, holds 64 MiB
    path = replace(tmp_path, TRAIN_Y, bomb)
    assert path.stat().st_size < 2**20
    monkeypatch.setattr(idx_mod.gzip, "GzipFile", _CountingGzip)
    _CountingGzip.total = 0
    with pytest.raises(DataError, match="holds more than that"):
        read_idx(path, idx_mod.LABELS_MAGIC, "labels")
    assert _CountingGzip.total <= 8 + 101  # header + declared + 1 byte

    _CountingGzip.total = 0
    huge = replace(tmp_path, TRAIN_X, header((2**20, 2**10, 2**10)) + bytes(32 * 2**20))
    with pytest.raises(DataError, match="more than the"):
        read_idx(huge, idx_mod.IMAGES_MAGIC, "images")
    assert _CountingGzip.total == 16  # only the header was decompressed


@pytest.mark.parametrize("missing", FILES)
def test_missing_file_says_which_where_and_how_to_get_it(tmp_path, missing):
    write_idx(tmp_path)
    (tmp_path / f"{missing}.gz").unlink()
    with pytest.raises(DataError) as err:
        get_datasets("fashion-mnist", tmp_path)
    message = str(err.value)
    assert f"missing Fashion-MNIST file {missing}[.gz] in {tmp_path}" in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(DataError, match=r"yann\.lecun\.com.*--data-root"):
        get_datasets("mnist", tmp_path)


def test_roots_mnist_needs_one_and_fashion_default_missing(tmp_path, monkeypatch):
    with pytest.raises(
        DataError, match=r"'mnist' has no default folder: download .*--data-root DIR"
    ):
        get_datasets("mnist")
    with pytest.raises(DataError, match="pass --data-root"):
        get_datasets("idx")
    gone = dataclasses.replace(idx_mod.FASHION_MNIST, default_root=str(tmp_path / "none"))
    monkeypatch.setitem(idx_mod.FORMATS, "fashion-mnist", gone)
    with pytest.raises(DataError, match="not installed in .*apt-get install dataset-fashion"):
        get_datasets("fashion-mnist")
    with pytest.raises(DataError, match="does not exist"):
        get_datasets("fashion-mnist", tmp_path / "elsewhere")


# --------------------------------------------------------------------------- CLI


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


TRAIN = ["train", "--model", "fmnist-vgg19", "--data", "idx", "--data-root", "data",
         "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip


def test_cli_trains_on_an_idx_folder(tmp_path, monkeypatch, capsys):
    write_idx(tmp_path / "data", n_train=32, n_test=16)
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "--out", "run"]) == 0
    assert "error" not in capsys.readouterr().err
    model = load_model(tmp_path / "run" / "model")
    assert model.eigendamage_spec["input_size"] == [1, 28, 28]
    assert model.eigendamage_spec["name"] == "fmnist-vgg19"
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cli_bad_idx_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    write_idx(tmp_path / "data")
    replace(tmp_path / "data", TRAIN_Y, idx_bytes(labels[:39]))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main([*TRAIN, "--out", "run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "holds 40 images but" in lines[0] and TRAIN_Y in lines[0]
    assert _tree(tmp_path) == before and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- models


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "params", "flops"),
    [("fmnist-vgg19", 1_255_258, 16_186_880), ("fmnist-resnet32", 1_859_946, 210_564_864)],
)
def test_fmnist_models_default_size_and_forward(name, params, flops):
    assert name in list_models()
    assert default_input_shape(name) == (1, 1, 28, 28)
    model = create_model(name)
    assert model.eigendamage_spec["input_size"] == [1, 28, 28]
    counts = count(model, (1, 1, 28, 28))
    assert (counts.params, counts.flops) == (params, flops)  # as the docstrings say
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fmnist_width_mult_scales_the_widths():
    assert create_model("fmnist-vgg19").features[0].out_channels == 16
    vgg = create_model("fmnist-vgg19", width_mult=1.0)
    assert vgg.features[0].out_channels == 64 and vgg.classifier.in_features == 512
    assert n_params(vgg) == 20_033_866  # the paper's VGG19 less two input channels
    res = create_model("fmnist-resnet32")
    assert (res.conv1.out_channels, res.fc.in_features) == (32, 128)
    wide = create_model("fmnist-resnet32", width_mult=1.0)
    assert (wide.conv1.out_channels, wide.layer2[0].conv1.out_channels) == (64, 128)
    assert n_params(wide) == 7_426_762
    # resnet32-wide at a quarter of the paper's widths is the classic thin ResNet-32
    thin = create_model("resnet32-wide", width_mult=0.25)
    assert n_params(thin) == n_params(create_model("resnet32"))
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ModelError, match="width_mult"):
            create_model("fmnist-resnet32", width_mult=bad)
        with pytest.raises(ModelError, match="width_mult"):
            create_model("fmnist-vgg19", width_mult=bad)


@pytest.mark.parametrize("name", ["fmnist-vgg19", "fmnist-resnet32"])
def test_fmnist_models_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name, width_mult=0.125)
    model.train()
    model(torch.randn(8, 1, 28, 28))  # move BN running statistics off their init
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.eigendamage_spec == model.eigendamage_spec
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert default_input_shape(str(tmp_path / "m")) == (1, 1, 28, 28)
