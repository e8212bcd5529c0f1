"""Untrusted dataset files (issue 12, items 9 and 10): a small or malformed file must give one
DataError naming the file (and key), never a huge allocation, uninitialised data, a traceback,
a RecursionError or a read outside the data root.

CIFAR files are written in the real format (pickles of dicts with bytes keys); the malicious
ones are crafted pickles.  Tiny-ImageNet and ImageFolder use real text files and images.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import eigendamage.data.cifar as cifar_module
import eigendamage.data.tiny_imagenet as tiny_module
from eigendamage.cli import main
from eigendamage.data import get_datasets
from eigendamage.data.cifar import CIFAR10, CIFAR100, read_cifar
from eigendamage.errors import DataError

try:  # the name numpy writes in pickles (numpy 2: numpy._core, numpy 1: numpy.core)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

# --------------------------------------------------------------------------- CIFAR helpers

LAYOUT = {
    "cifar10": (CIFAR10, [f"data_batch_{i}" for i in range(1, 6)]),
    "cifar100": (CIFAR100, ["train"]),
}


def batch(n: int = 4, classes: int = 10, label_key: bytes = b"labels", seed: int = 0) -> dict:
    """One batch in the official layout: bytes keys, uint8 (N, 3072) data, a list of labels."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch 1 of 1",
        label_key: [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def release_files(name: str = "cifar10") -> dict[str, bytes]:
    """Every file of a small, valid release: protocol-2 pickles, as CIFAR's own loaders read."""
    fmt, train = LAYOUT[name]
    n = 8 if name == "cifar100" else 4
    files = {
        f: pickle.dumps(batch(n, fmt.num_classes, fmt.label_key, i), protocol=2)
        for i, f in enumerate(train)
    }
    files[fmt.test_file] = pickle.dumps(batch(4, fmt.num_classes, fmt.label_key, 9), protocol=2)
    names = [f"class{i}".encode() for i in range(fmt.num_classes)]
    files[fmt.meta_file] = pickle.dumps({fmt.names_key: names}, protocol=2)
    return files


def write_release(
    root: Path, replace: dict[str, bytes] | None = None, name: str = "cifar10", archive=False
) -> Path:
    """Write the release as the extracted folder (or .tar.gz) with some files replaced."""
    fmt, _ = LAYOUT[name]
    files = {**release_files(name), **(replace or {})}
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / fmt.archive, "w:gz") as tar:
            for fname, data in files.items():
                info = tarfile.TarInfo(f"{fmt.folder}/{fname}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return root / fmt.archive
    (root / fmt.folder).mkdir(exist_ok=True)
    for fname, data in files.items():
        (root / fmt.folder / fname).write_bytes(data)
    return root / fmt.folder


class Call:
    """Pickles as ``func(*args)`` (with ``state`` applied by BUILD): the way to craft files."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


def array_with_state(shape, dtype, raw) -> Call:
    """An ndarray pickled the way numpy does it, with a state of our choosing."""
    return Call(_reconstruct, np.ndarray, (0,), b"b", state=(1, shape, dtype, False, raw))


#: The issue's file: a ~85-byte pickle declaring 700000 uninitialised images (and labels).
HUGE_UNINITIALISED = pickle.dumps(
    {
        b"data": Call(np.ndarray, (700000, 3072), "B"),
        b"labels": Call(np.ndarray, (700000,), "<i8"),
    },
    protocol=4,
)


def peak_bytes(func) -> int:
    """Peak Python/numpy memory allocated while ``func`` runs (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        func()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(root: Path, name: str = "cifar10") -> int:
    """Load ``root`` expecting a DataError; return the peak memory the attempt took."""

    def load():
        with pytest.raises(DataError):
            read_cifar(root, LAYOUT[name][0])

    return peak_bytes(load)


def data_error(root: Path, name: str = "cifar10") -> str:
    with pytest.raises(DataError) as err:
        read_cifar(root, LAYOUT[name][0])
    return str(err.value)


# --------------------------------------------------------------------------- item 9: sizes


@pytest.mark.parametrize("archive", [False, True])
def test_tiny_pickle_declaring_700000_uninitialised_images_is_refused(tmp_path, archive):
    assert len(HUGE_UNINITIALISED) < 100
    write_release(tmp_path, {"data_batch_2": HUGE_UNINITIALISED}, archive=archive)
    msg = data_error(tmp_path)
    assert "data_batch_2" in msg and "numpy.ndarray" in msg and "uninitialised" in msg


@pytest.mark.parametrize(
    ("declared", "labels"),
    [
        # numpy's _reconstruct itself allocates the shape it is given, uninitialised
        (
            Call(_reconstruct, np.ndarray, (70000, 3072), b"B"),
            Call(_reconstruct, np.ndarray, (70000,), b"l"),
        ),
        # a state whose shape is larger than its bytes, or bytes that fit another dtype
        (array_with_state((700000, 3072), np.dtype("u1"), b"\x00" * 64), None),
        (array_with_state((4, 3072), np.dtype("u1"), b"\x00" * (4 * 3072 + 1)), None),
        (array_with_state((4, 3072), np.dtype("<i8"), b"\x00" * (4 * 3072)), None),
    ],
    ids=["reconstruct-shape", "short-data", "long-data", "dtype-size"],
)
def test_array_declarations_must_match_their_bytes(tmp_path, declared, labels):
    bad = batch()
    bad[b"data"] = declared
    if labels is not None:
        bad[b"labels"] = labels
    write_release(tmp_path, {"data_batch_1": pickle.dumps(bad, protocol=2)})
    msg = data_error(tmp_path)
    assert "data_batch_1" in msg and ("refusing" in msg or "corrupt" in msg)


@pytest.mark.parametrize(
    "dtype",
    [np.dtype(object), np.dtype([("a", "u1"), ("b", "u1")]), np.dtype("S4"), np.dtype("M8[s]")],
    ids=["object", "structured", "bytes", "datetime"],
)
def test_only_plain_numeric_dtypes_are_unpickled(tmp_path, dtype):
    raw = [1, 2] if dtype.hasobject else b"\x00" * (2 * dtype.itemsize)
    bad = batch()
    bad[b"labels"] = array_with_state((2,), dtype, raw)
    write_release(tmp_path, {"test_batch": pickle.dumps(bad, protocol=2)})
    msg = data_error(tmp_path)
    assert "test_batch" in msg and "only plain numeric arrays" in msg


def _memo_bomb() -> bytes:
    return b"\x80\x02]r" + struct.pack("<I", 4_000_000) + b"."  # LONG_BINPUT 4e6: 64 MB memo


def _declared_bytes(opcode: bytes, width: int) -> bytes:
    return b"\x80\x04" + opcode + (1 << 28).to_bytes(width, "little") + b"abc."


@pytest.mark.parametrize(
    "data",
    [
        _memo_bomb(),
        _declared_bytes(b"B", 4),  # BINBYTES
        _declared_bytes(b"\x8e", 8),  # BINBYTES8
        _declared_bytes(b"\x96", 8),  # BYTEARRAY8
    ],
    ids=["memo-index", "binbytes", "binbytes8", "bytearray8"],
)
def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path, data):
    """CPython allocates these before reading: 9-20 bytes would cost 64-256 MB (or, with a
    bigger number, all memory)."""
    assert len(data) < 25
    write_release(tmp_path, {"data_batch_3": data})
    assert refused(tmp_path) < 16 * 2**20
    assert "corrupt or truncated pickle file" in data_error(tmp_path)


def _codec_chain(depth: int) -> bytes:
    """_codecs.encode(..._codecs.encode(b'ab', 'hex')..., 'hex'): doubles at every step."""
    expr = b"C\x02ab"  # SHORT_BINBYTES
    for _ in range(depth):
        expr = b"h\x00" + expr + b"\x8c\x03hex\x86R"
    return b"\x80\x04c_codecs\nencode\nq\x00" + expr + b"0}."


def test_codec_chains_cannot_expand_a_small_file(tmp_path):
    data = _codec_chain(22)  # 8 MB from < 300 bytes (30 steps would be 2 GB)
    assert len(data) < 300
    write_release(tmp_path, {"data_batch_1": data})
    assert refused(tmp_path) < 4 * 2**20
    assert "_codecs.encode" in data_error(tmp_path)


def test_shared_containers_cannot_fake_a_huge_structure(tmp_path):
    """2000 references to one 2000-element list cost 8 KB of pickle, 32 MB as an array."""
    row = [0] * 2000
    bad = batch()
    bad[b"labels"] = [row] * 2000
    write_release(tmp_path, {"data_batch_1": pickle.dumps(bad, protocol=2)})
    assert refused(tmp_path) < 8 * 2**20
    msg = data_error(tmp_path)
    assert "data_batch_1" in msg


def _nested(depth: int, key: bytes) -> bytes:
    """A valid batch or meta file whose ``key`` entry holds ``[[[...]]]`` nested ``depth`` deep
    (2 bytes a level): b"label_names" gets nine plain names before it."""
    deep = b"]" * depth + b"a" * (depth - 1)
    if key == b"label_names":
        names = b"(" + b"U\x01a" * 9 + deep + b"l"
        return b"\x80\x02}U" + bytes([len(key)]) + key + names + b"s."
    bad = batch()
    bad[key] = b"PLACEHOLDER_DEEP"
    raw = pickle.dumps(bad, protocol=3)  # protocol 3: bytes are one SHORT_BINBYTES opcode
    assert raw.count(b"C\x10PLACEHOLDER_DEEP") == 1
    return raw.replace(b"C\x10PLACEHOLDER_DEEP", deep)


@pytest.mark.parametrize("key", [b"labels", b"data", b"label_names"])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, key):
    """As a class name, str() of it raised RecursionError; elsewhere numpy might."""
    target = "batches.meta" if key == b"label_names" else "data_batch_1"
    write_release(tmp_path, {target: _nested(100_000, key)})
    msg = data_error(tmp_path)
    assert target in msg and "nests containers more than" in msg


def test_self_referencing_labels_are_refused(tmp_path):
    bad = batch()
    loop: list = []
    loop.append(loop)
    bad[b"labels"] = loop
    write_release(tmp_path, {"data_batch_1": pickle.dumps(bad, protocol=2)})
    assert "data_batch_1" in data_error(tmp_path)


# --------------------------------------------------------------------------- item 9: values


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ([1] * 3 + [10], "label 10 out of range 0..9"),
        ([0] * 3 + [-3], "label -3 out of range"),
        ([0] * 3 + [2**4000], "label of 4001 bits out of range"),
        (np.array([0, 0, 0, 250], np.uint8), "label 250 out of range"),
        ([0, 1, True, 2], "'labels'[2] is a bool"),
        ([0, 1, 2, 3.0], "'labels'[3] is a float"),
        ([0, 1, 2, b"3"], "'labels'[3] is a bytes"),
        (b"0123", "'labels' is a bytes"),
        ("0123", "'labels' is a str"),
        ({0: 1}, "'labels' is a dict"),
        ([[0], [1], [2], [3]], "'labels'[0] is a list"),
        (np.zeros((4, 1), np.int64), "'labels' has shape (4, 1)"),
        (np.zeros(4, np.float32), "'labels' holds float32 values"),
        (np.zeros(4, bool), "'labels' holds bool values"),
        ([0, 1, 2], "'labels' has shape (3,), expected (4,)"),
    ],
)
def test_bad_labels_name_file_and_key(tmp_path, labels, fragment):
    bad = batch()
    bad[b"labels"] = labels
    write_release(tmp_path, {"data_batch_5": pickle.dumps(bad, protocol=2)})
    msg = data_error(tmp_path)
    assert "data_batch_5" in msg and fragment in msg
    assert len(msg) < 400


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([[0] * 3072 for _ in range(4)], "'data' is a list"),
        (b"\x00" * 4 * 3072, "'data' is a bytes"),
        (np.zeros((0, 3072), np.uint8), "'data' holds no images"),
        (np.zeros((4, 3, 32, 32), np.uint8), "'data' has shape (4, 3, 32, 32)"),
        (np.zeros((4, 3072), np.float64), "'data' has dtype float64"),
    ],
)
def test_bad_data_names_file_and_key(tmp_path, data, fragment):
    bad = batch()
    bad[b"data"] = data
    if len(data) == 0:
        bad[b"labels"] = []
    write_release(tmp_path, {"test_batch": pickle.dumps(bad, protocol=2)})
    msg = data_error(tmp_path)
    assert "test_batch" in msg and fragment in msg


def test_str_keys_of_a_python3_repickle_load(tmp_path):
    good = {k.decode(): v for k, v in batch(seed=3).items()}
    write_release(tmp_path, {"data_batch_1": pickle.dumps(good, protocol=2)})
    train_x, train_y, *_ = read_cifar(tmp_path, CIFAR10)
    assert type(train_x) is np.ndarray and train_x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(train_x[:4].reshape(4, -1), good["data"])
    assert train_y[:4].tolist() == good["labels"]


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the official files have them."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def test_python2_format_still_loads(tmp_path):
    """Dtype codes, byte orders and data arrive as bytes from the official Python 2 files."""
    good = batch(seed=5)
    data = py2_pickle(good)
    assert b"U\x02u1" in data and b"numpy.core.multiarray" in data and b"_codecs" not in data
    names = [f"name{i}" for i in range(10)]
    meta = py2_pickle({b"label_names": names, b"num_vis": 3072})
    write_release(tmp_path, {"data_batch_1": data, "batches.meta": meta})
    train_x, train_y, _, _, classes = read_cifar(tmp_path, CIFAR10)
    np.testing.assert_array_equal(train_x[:4].reshape(4, -1), good[b"data"])
    assert train_y[:4].tolist() == good[b"labels"] and classes == tuple(names)


def test_big_endian_and_int_label_arrays_load(tmp_path):
    good = batch(seed=6)
    good[b"labels"] = np.array(good[b"labels"], ">i4")
    write_release(tmp_path, {"data_batch_1": pickle.dumps(good, protocol=2)})
    _, train_y, *_ = read_cifar(tmp_path, CIFAR10)
    assert train_y[:4].tolist() == good[b"labels"].tolist() and train_y.dtype == np.int64


@pytest.mark.parametrize("archive", [False, True])
def test_oversized_files_are_refused_before_reading(tmp_path, monkeypatch, archive):
    monkeypatch.setattr(cifar_module, "MAX_FILE_BYTES", 8000)
    write_release(tmp_path, archive=archive)
    msg = data_error(tmp_path)
    assert "data_batch_1" in msg and "bytes, more than any CIFAR file" in msg


# --------------------------------------------------------------------------- item 10: meta


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [False, True])
def test_non_utf8_class_names_are_one_data_error(tmp_path, name, archive):
    fmt, _ = LAYOUT[name]
    names = [f"c{i}".encode() for i in range(fmt.num_classes)]
    names[3] = b"caf\xe9"  # latin-1, not UTF-8
    meta = pickle.dumps({fmt.names_key: names}, protocol=2)
    write_release(tmp_path, {fmt.meta_file: meta}, name=name, archive=archive)
    msg = data_error(tmp_path, name)
    assert fmt.meta_file in msg and f"{fmt.names_key.decode()!r}[3]" in msg and "UTF-8" in msg


@pytest.mark.parametrize(
    ("meta", "fragment"),
    [
        ([b"a"] * 10, "has no 'label_names' entry"),
        ({b"label_names": [b"a"] * 9}, "'label_names' has 9 entries, expected"),
        ({b"label_names": b"abcdefghij"}, "'label_names' has a bytes"),
        ({b"label_names": [b"a"] * 9 + [7]}, "'label_names'[9] is a int"),
        ({b"label_names": [b"a"] * 9 + [b"\x1b[2Jx"]}, "'label_names'[9] = '\\x1b[2Jx'"),
        ({b"label_names": [b"a"] * 9 + [b""]}, "'label_names'[9] = ''"),
    ],
)
def test_malformed_meta_is_a_data_error(tmp_path, meta, fragment):
    write_release(tmp_path, {"batches.meta": pickle.dumps(meta, protocol=2)})
    msg = data_error(tmp_path)
    assert "batches.meta" in msg and fragment in msg and "delete it" in msg


# --------------------------------------------------------------------------- archives


def _link_archive(root: Path, kind: bytes, target: str) -> Path:
    files = release_files()
    path = root / CIFAR10.archive
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for fname, data in files.items():
            info = tarfile.TarInfo(f"{CIFAR10.folder}/{fname}")
            if fname == "data_batch_1":
                info.type, info.linkname = kind, target
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("../escaped")  # would land outside the folder if extracted
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize(
    ("kind", "target", "word"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symbolic link"),
        (tarfile.SYMTYPE, "../../outside", "symbolic link"),
        (tarfile.LNKTYPE, f"{CIFAR10.folder}/data_batch_2", "hard link"),
    ],
)
def test_archive_links_are_refused_and_nothing_is_extracted(tmp_path, kind, target, word):
    root = tmp_path / "root"
    _link_archive(root, kind, target)
    before = sorted(p for p in tmp_path.rglob("*"))
    msg = data_error(root)
    assert f"{CIFAR10.folder}/data_batch_1 is a {word}" in msg and "refusing to follow" in msg
    assert sorted(p for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- CLI


def _train(tmp_path: Path, data: str = "cifar10") -> list[str]:
    return [
        "train", "--model", "digits-vgg", "--data", data, "--data-root", str(tmp_path / "d"),
        "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out"),
    ]  # fmt: skip


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_tiny_pickle_with_huge_array_is_one_error_line(tmp_path, capsys):
    write_release(tmp_path / "d", {"data_batch_1": HUGE_UNINITIALISED})
    assert main(_train(tmp_path)) == 2
    line = _one_error_line(capsys)
    assert "data_batch_1" in line and "uninitialised" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cli_non_utf8_meta_is_one_error_line(tmp_path, capsys, name):
    fmt, _ = LAYOUT[name]
    names = [b"\xff\xfe%d" % i for i in range(fmt.num_classes)]
    write_release(
        tmp_path / "d", {fmt.meta_file: pickle.dumps({fmt.names_key: names}, protocol=2)}, name
    )
    assert main(_train(tmp_path, name)) == 2
    line = _one_error_line(capsys)
    assert fmt.meta_file in line and "UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_cli_archive_link_is_one_error_line(tmp_path, capsys):
    _link_archive(tmp_path / "d", tarfile.SYMTYPE, "/etc/passwd")
    assert main(_train(tmp_path)) == 2
    assert "symbolic link" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fuzz

_KEYS = [b"data", "data", b"labels", "labels", b"fine_labels", b"batch_label", b"filenames", 7]
_DTYPES = ["u1", "i1", "<i8", ">i4", "<f4", "?", "<c8"]
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=8),
    st.text(max_size=8),
)


@st.composite
def _arrays(draw):
    dims = st.lists(st.sampled_from([0, 1, 2, 3, 4, 3072]), max_size=3)
    # at most 4 images' worth: (3072, 3072, 3072) would be 27 GiB of random bytes
    shape = tuple(draw(dims.filter(lambda d: int(np.prod(d)) <= 4 * 3072)))
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    raw = rng.bytes(int(np.prod(shape)) * dtype.itemsize)
    if draw(st.booleans()):  # small values, so integer arrays are often valid labels
        raw = bytes(b % 10 for b in raw) if dtype.itemsize == 1 else raw
    return np.frombuffer(raw, dtype).reshape(shape).copy()


@st.composite
def _batches(draw):
    n = draw(st.integers(0, 4))
    base = batch(max(n, 1), seed=draw(st.integers(0, 3)))
    if n == 0:
        base[b"data"], base[b"labels"] = np.zeros((0, 3072), np.uint8), []
    values = st.one_of(
        _leaf,
        _arrays(),
        st.lists(st.integers(-2, 12), min_size=n, max_size=n),
        st.lists(_leaf, max_size=5),
        st.lists(st.lists(st.integers(0, 9), max_size=3), max_size=4),
        st.dictionaries(st.sampled_from(_KEYS), _leaf, max_size=3),
    )
    changes = draw(st.dictionaries(st.sampled_from(_KEYS), values, max_size=3))
    drop = draw(st.lists(st.sampled_from(list(base)), max_size=2))
    for key in drop:
        base.pop(key, None)
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_release(root)
    return root


def _check_or_data_error(root: Path) -> tuple | None:
    """Load ``root``: a DataError (None) or arrays that are valid CIFAR-10 data; nothing else."""
    try:
        loaded = read_cifar(root, CIFAR10)
    except DataError:
        return None
    train_x, train_y, test_x, test_y, names = loaded
    for x, y in ((train_x, train_y), (test_x, test_y)):
        assert type(x) is np.ndarray and x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32)
        assert type(y) is np.ndarray and y.dtype == np.int64 and y.shape == (len(x),)
        assert len(x) > 0 and ((y >= 0) & (y < 10)).all()
    assert len(names) == 10
    return loaded


def _entry(obj: dict, key: bytes):
    return obj[key] if key in obj else obj.get(key.decode())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_batches(), protocol=st.sampled_from([0, 2, 4]))
def test_fuzz_batch_dicts_give_valid_arrays_or_data_error(fuzz_root, obj, protocol):
    path = fuzz_root / CIFAR10.folder / "data_batch_1"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = _check_or_data_error(fuzz_root)
    if loaded is None:
        return
    # Accepted: then the batch was a real one, and came back unchanged.
    data, labels = _entry(obj, b"data"), _entry(obj, b"labels")
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    assert data.shape[1] == 3072 and len(data) > 0
    if isinstance(labels, list):
        assert all(type(v) is int for v in labels)
    else:
        assert isinstance(labels, np.ndarray) and labels.dtype.kind in "iu"
    train_x, train_y = loaded[0][: len(data)], loaded[1][: len(data)]
    np.testing.assert_array_equal(train_x.reshape(len(data), -1), data)
    np.testing.assert_array_equal(train_y, np.asarray(labels, dtype=np.int64))


_SMALL = pickle.dumps(batch(2), protocol=2)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(_SMALL) - 1), st.integers(0, 255), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    cut=st.integers(1, len(_SMALL)),
)
def test_fuzz_mutated_pickles_give_valid_arrays_or_data_error(fuzz_root, edits, cut):
    """Random byte edits can form any opcode with any length or memo index (on the old code
    this can allocate tens of GB, so run it only against the fixed loader)."""
    data = bytearray(_SMALL)
    for pos, value, insert in edits:
        if insert:
            data.insert(pos, value)
        else:
            data[pos] = value
    path = fuzz_root / CIFAR10.folder / "test_batch"
    try:
        path.write_bytes(bytes(data[:cut]))
        _check_or_data_error(fuzz_root)
    finally:
        path.write_bytes(release_files()["test_batch"])


# --------------------------------------------------------------------------- Tiny-ImageNet


def write_image(path: Path, size=(64, 64), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_tiny(root: Path, wnids=("n02", "n01")) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(3):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", seed=c * 10 + i)
        write_image(base / "val" / "images" / f"val_{c}.JPEG", seed=100 + c)
        lines.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def tiny_error(root: Path) -> str:
    with pytest.raises(DataError) as err:
        get_datasets("tiny-imagenet", root)
    return str(err.value)


@pytest.mark.parametrize("name", ["wnids.txt", "val/val_annotations.txt", "words.txt"])
def test_tiny_text_with_bad_encoding_names_file_and_line(tmp_path, name):
    base = write_tiny(tmp_path)
    path = base / name
    text = path.read_bytes() if path.exists() else b"n01\tgoldfish\nn02\ttabby\n"
    path.write_bytes(text + b"n0\xff\xfe\n")
    msg = tiny_error(tmp_path)
    assert str(path) in msg and "line 3: not UTF-8" in msg and "0xff" in msg


def test_tiny_huge_annotation_line_gives_a_short_message(tmp_path):
    base = write_tiny(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "x" * 2_000_000 + "\n")
    msg = tiny_error(tmp_path)
    assert "line 3: malformed line 'xxx" in msg and len(msg) < 400


def test_tiny_unknown_huge_class_gives_a_short_message(tmp_path):
    base = write_tiny(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\t" + "n" * 1_000_000 + "\t0\t0\t1\t1\n")
    msg = tiny_error(tmp_path)
    assert "line 3: class 'nnn" in msg and "is not listed in wnids.txt" in msg
    assert len(msg) < 400


@pytest.mark.parametrize("wnid", ["../../outside", "..", "a/b", "n01\x1b[2J", "x" * 300])
def test_tiny_class_ids_cannot_leave_the_train_folder(tmp_path, wnid):
    """A wnid names a folder under train/; '../../outside' would read images outside root."""
    base = write_tiny(tmp_path)
    write_image(tmp_path / "outside" / "images" / "stolen.JPEG")
    (base / "wnids.txt").write_text(f"n01\nn02\n{wnid}\n")
    msg = tiny_error(tmp_path)
    assert "wnids.txt, line 3" in msg and "is not a class id" in msg and len(msg) < 400


def test_tiny_wnids_with_byte_order_mark_loads(tmp_path):
    base = write_tiny(tmp_path)
    (base / "wnids.txt").write_bytes(b"\xef\xbb\xbfn02\r\nn01\r\n")
    spec = get_datasets("tiny-imagenet", tmp_path)[3]
    assert spec.classes == ("n01", "n02")


def test_tiny_oversized_text_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_module, "MAX_TEXT_BYTES", 1000)
    base = write_tiny(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() * 40)
    msg = tiny_error(tmp_path)
    assert str(ann) in msg and "more than a Tiny-ImageNet text file can be" in msg


# --------------------------------------------------------------------------- images


def write_imagefolder(root: Path, per_class: int = 3) -> None:
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            write_image(root / "train" / name / f"{i}.png", size=(40, 40), seed=10 * c + i)


@pytest.mark.parametrize("limit", [1200, 3000], ids=["pillow-error", "pillow-warning"])
@pytest.mark.parametrize("dataset", ["tiny-imagenet", "imagefolder"])
def test_decompression_bombs_are_data_errors_naming_the_file(
    tmp_path, monkeypatch, recwarn, capsys, limit, dataset
):
    """Pillow raises above 2x MAX_IMAGE_PIXELS but only warns between 1x and 2x."""
    if dataset == "tiny-imagenet":
        write_tiny(tmp_path)
        bomb = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    else:
        write_imagefolder(tmp_path)
        bomb = tmp_path / "train" / "dog" / "1.png"
    write_image(bomb, size=(40, 100))  # 4000 pixels: > 2 x 1200, between 3000 and 6000
    train, val, test, _ = get_datasets(dataset, tmp_path, val_fraction=0.0, image_size=None)
    split = test if dataset == "tiny-imagenet" else train
    paths = list(split.source.paths)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    index = int(np.flatnonzero(split.indices == paths.index(bomb))[0])
    with pytest.raises(DataError, match="cannot read image file") as err:
        split[index]
    assert str(bomb) in str(err.value) and "exceeds limit" in str(err.value)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a\xff\xff"])
def test_corrupt_imagefolder_images_name_the_file(tmp_path, damage):
    write_imagefolder(tmp_path)
    bad = tmp_path / "train" / "cat" / "2.png"
    bad.write_bytes(damage)
    train = get_datasets("imagefolder", tmp_path, val_fraction=0.0, image_size=16)[0]
    index = int(np.flatnonzero(train.indices == list(train.source.paths).index(bad))[0])
    with pytest.raises(DataError, match="cannot read image file") as err:
        train[index]
    assert str(bad) in str(err.value)


def test_imagefolder_symlink_loop_is_entered_once(tmp_path):
    """os.walk(followlinks=True) went round the loop until the kernel's 40-link limit."""
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "cat" / "again").symlink_to(tmp_path / "train" / "cat")
    train = get_datasets("imagefolder", tmp_path, val_fraction=0.0, image_size=16)[0]
    assert len(train) == 6


def test_imagefolder_links_to_an_ancestor_end(tmp_path):
    """Two links back up made os.walk visit ~2**40 paths; a folder is not entered again
    below itself, so each class reaches the other once."""
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "dog" / "up").symlink_to(tmp_path / "train")
    (tmp_path / "train" / "cat" / "up").symlink_to(tmp_path / "train")
    train = get_datasets("imagefolder", tmp_path, val_fraction=0.0, image_size=16)[0]
    names = sorted(str(p.relative_to(tmp_path / "train")) for p in train.source.paths)
    assert len(names) == 12 and "cat/up/dog/0.png" in names and "dog/up/cat/2.png" in names


def test_imagefolder_skips_fifos_named_like_images(tmp_path):
    """Opening a FIFO blocks forever; it is not an image file."""
    write_imagefolder(tmp_path)
    os.mkfifo(tmp_path / "train" / "cat" / "pipe.png")
    train = get_datasets("imagefolder", tmp_path, val_fraction=0.0, image_size=16)[0]
    assert len(train) == 6 and all(p.name != "pipe.png" for p in train.source.paths)
