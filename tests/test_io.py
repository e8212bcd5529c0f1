"""Atomic writes, output dirs, safe checkpoints and pickle-free model files."""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from eigendamage import io
from eigendamage.errors import EigenDamageError, ModelError, OutputExistsError
from eigendamage.io import CheckpointError, architecture, atomic, module_specs
from eigendamage.seeding import environment_info, rng_state, seed_everything, set_rng_state

# --------------------------------------------------------------------------- atomic writes


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_roundtrip(tmp_path: Path) -> None:
    io.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    io.atomic_write_text(tmp_path / "sub" / "a.txt", "héllo")
    obj = {
        "b": np.float32(0.5),
        "a": torch.tensor(3),
        "arr": np.arange(3),
        "t": torch.tensor([1.0, 2.0]),
        "p": tmp_path,
        "i": np.int64(7),
    }
    io.atomic_write_json(tmp_path / "a.json", obj)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    text = (tmp_path / "a.json").read_text()
    loaded = json.loads(text)
    assert loaded == {"a": 3, "arr": [0, 1, 2], "b": 0.5, "i": 7, "p": str(tmp_path), "t": [1, 2]}
    assert list(loaded) == sorted(loaded)  # sorted keys
    assert text.startswith('{\n  "a"')  # indent 2
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_write_failure_keeps_old_file_and_cleans_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.json"
    io.atomic_write_json(target, {"v": 1})

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []

    with pytest.raises(TypeError):
        io.atomic_write_json(target, {"v": object()})
    with pytest.raises(Exception):  # noqa: B017 - lambdas cannot be pickled
        io.atomic_torch_save(tmp_path / "x.pt", {"f": lambda: 0})
    assert json.loads(target.read_text()) == {"v": 1}
    assert not (tmp_path / "x.pt").exists()
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- output dirs


def test_prepare_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert io.prepare_output_dir(out, force=False) == out and out.is_dir()
    io.prepare_output_dir(out, force=False)  # empty: fine
    (out / "keep.txt").write_text("work")
    with pytest.raises(OutputExistsError) as info:
        io.prepare_output_dir(out, force=False)
    msg = str(info.value)
    assert str(out) in msg and "--force" in msg and f"--resume {out}" in msg
    io.prepare_output_dir(out, force=True)
    io.prepare_output_dir(out, force=False, resume=True)
    assert (out / "keep.txt").read_text() == "work"  # force never deletes up front
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        io.prepare_output_dir(tmp_path / "file", force=True)


def test_check_output_dir_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    assert io.check_output_dir(out, force=False) == out and not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        io.check_output_dir(tmp_path / "f" / "run", force=True)
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".config.json.123.deadbeef.tmp"
    stale.write_text("partial")
    io.check_output_dir(run, force=False)  # only a killed write's temp file: still empty
    (run / ".mine.tmp").write_text("not ours")
    assert io.remove_stale_temp_files(run) == [stale]
    assert (run / ".mine.tmp").exists()


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_with_rng_state(tmp_path: Path) -> None:
    seed_everything(3)
    random.random()
    np.random.rand()
    torch.randn(1)
    state = {
        "model": OrderedDict(w=torch.randn(3, 2)),
        "epoch": 4,
        "history": {"loss": [1.0, 0.5], "name": "x", "none": None},
        "np": np.arange(4, dtype=np.float32),
        "rng": rng_state(),
    }
    io.save_checkpoint(tmp_path / "c.pt", state)
    expected = (random.random(), np.random.rand(), torch.randn(2))

    random.random(), np.random.rand(), torch.randn(5)  # move all RNGs on
    loaded = io.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 4 and loaded["history"] == state["history"]
    assert torch.equal(loaded["np"], torch.arange(4, dtype=torch.float32))
    set_rng_state(loaded["rng"])
    got = (random.random(), np.random.rand(), torch.randn(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_rng_state_survives_gaussian_cache() -> None:
    seed_everything(1)
    random.gauss(0, 1)  # leaves gauss_next cached
    np.random.standard_normal()  # numpy caches the second gaussian
    snap = rng_state()
    a = (random.gauss(0, 1), np.random.standard_normal())
    set_rng_state(snap)
    assert (random.gauss(0, 1), np.random.standard_normal()) == a


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.pt"):
        io.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(200))
    with pytest.raises(CheckpointError, match="junk.pt"):
        io.load_checkpoint(tmp_path / "junk.pt")
    io.save_checkpoint(tmp_path / "ok.pt", {"w": torch.randn(100)})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        io.load_checkpoint(tmp_path / "trunc.pt")
    # A pickled arbitrary object is refused instead of being unpickled.
    torch.save({"obj": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        io.load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(TypeError, match=r"state\.bad"):
        io.save_checkpoint(tmp_path / "bad.pt", {"bad": _Evil()})
    assert issubclass(CheckpointError, EigenDamageError)


class _Evil:
    pass


def test_environment_info() -> None:
    info = environment_info()
    for key in ("python", "torch", "torchvision", "numpy", "platform", "cpu_count"):
        assert info[key]
    assert "cuda_device" in info
    commit = info["git_commit"]
    assert commit is None or len(commit) == 40
    json.dumps(info)


# --------------------------------------------------------------------------- model files


class Block(nn.Module):
    """An opaque (unregistered) block, like a ResNet BasicBlock."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.extra = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.extra is not None:
            y = self.extra(y)
        return torch.relu(y) + x


class Net(nn.Module):
    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.block = Block(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.features(x))), 1))


def _build(spec: dict) -> nn.Module:
    if spec["name"] != "net":
        raise ModelError(f"unknown model {spec['name']!r}")
    model = Net(**spec["kwargs"])
    model.eigendamage_spec = {"name": spec["name"], "kwargs": dict(spec["kwargs"])}
    return model


class StandInKFE(nn.Sequential):
    """Stand-in with the KFEBottleneck contract: Sequential of rot_in, core, rot_out."""

    def __init__(self, rot_in: nn.Module, core: nn.Module, rot_out: nn.Module) -> None:
        super().__init__(OrderedDict(rot_in=rot_in, core=core, rot_out=rot_out))


@pytest.fixture
def base_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(architecture, "_build_base", _build)
    monkeypatch.setitem(
        module_specs._REGISTRY,
        "KFEBottleneck",
        io.ModuleType(
            "KFEBottleneck",
            lambda m: {},
            lambda args, ch: StandInKFE(ch["rot_in"], ch["core"], ch["rot_out"]),
            StandInKFE,
            True,
        ),
    )


def _pruned() -> nn.Module:
    """Thin the first conv to 5 channels and put a KFE bottleneck in the block."""
    torch.manual_seed(0)
    m = _build({"name": "net", "kwargs": {"width": 8}})
    m.features[0] = nn.Conv2d(1, 5, 3, padding=1, bias=False)
    m.features[1] = nn.BatchNorm2d(5)
    m.block = Block(5)
    m.block.conv = StandInKFE(
        nn.Conv2d(5, 4, 1, bias=False), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(3, 5, 1)
    )
    m.block.extra = None
    m.fc = nn.Linear(5, 3)
    for buf in m.buffers():  # make BN running stats non-trivial
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return m


def test_save_load_pruned_model_bit_exact(tmp_path: Path, base_builder: None) -> None:
    model = _pruned().eval()
    out = io.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["architecture.json", "model.safetensors"]
    doc = json.loads((out / "architecture.json").read_text())
    assert doc["format"] == "eigendamage-model" and doc["version"] == 1
    assert doc["base"] == {"name": "net", "kwargs": {"width": 8}}
    mods = doc["modules"]
    assert set(mods) == {"features.0", "features.1", "block.conv", "block.bn", "block.extra", "fc"}
    assert mods["block.extra"] is None
    assert mods["features.0"] == {
        "type": "Conv2d",
        "args": {
            "in_channels": 1,
            "out_channels": 5,
            "kernel_size": [3, 3],
            "stride": [1, 1],
            "padding": [1, 1],
            "dilation": [1, 1],
            "groups": 1,
            "bias": False,
            "padding_mode": "zeros",
        },
    }
    assert mods["block.conv"]["type"] == "KFEBottleneck"
    assert list(mods["block.conv"]["children"]) == ["rot_in", "core", "rot_out"]
    assert mods["block.bn"]["args"]["num_features"] == 5
    weights = load_file(out / "model.safetensors")  # plain tensors, no pickle
    assert set(weights) == set(model.state_dict())

    before = torch.get_rng_state()
    loaded = io.load_model(out)
    assert torch.equal(before, torch.get_rng_state())  # rebuilding the base draws no RNG
    assert isinstance(loaded.block.conv, StandInKFE) and loaded.block.extra is None
    assert loaded.eigendamage_spec == {"name": "net", "kwargs": {"width": 8}}
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), loaded.eval()(x))


def test_unchanged_model_has_no_modules(tmp_path: Path, base_builder: None) -> None:
    model = _build({"name": "net", "kwargs": {"width": 4}})
    io.save_model(model, tmp_path)
    doc = json.loads((tmp_path / "architecture.json").read_text())
    assert doc["modules"] == {}
    io.load_model(tmp_path / "architecture.json")  # a file inside the dir is accepted


def test_shared_tensors_roundtrip(tmp_path: Path, base_builder: None) -> None:
    model = _build({"name": "net", "kwargs": {"width": 4, "classes": 4}})
    model.tied = nn.Linear(4, 4)
    model.tied.weight = model.fc.weight
    io.save_model(model, tmp_path)
    loaded = io.load_model(tmp_path)
    assert torch.equal(loaded.tied.weight, model.fc.weight)


def test_unknown_module_type_names_path(tmp_path: Path, base_builder: None) -> None:
    model = _build({"name": "net", "kwargs": {}})
    model.features[2] = nn.PReLU()
    with pytest.raises(ModelError, match=r"'features\.2'.*PReLU"):
        io.save_model(model, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_model_without_spec_is_saved_whole_when_describable(tmp_path: Path) -> None:
    """Issue 15 turned this refusal into a save: a root of a registered type is described
    whole, so it loads without a fresh instance (tests/test_save_any_model.py: the rest)."""
    model = nn.Linear(2, 2)
    io.save_model(model, tmp_path)
    assert torch.equal(io.load_model(tmp_path).weight, model.weight)


def test_registered_custom_type(tmp_path: Path, base_builder: None) -> None:
    class Scale(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    model = _build({"name": "net", "kwargs": {}})
    model.features[2] = Scale(2.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            module_specs._REGISTRY,
            "Scale",
            io.ModuleType("Scale", lambda m: {"factor": m.factor}, lambda a, ch: Scale(**a)),
        )
        io.save_model(model, tmp_path)
        loaded = io.load_model(tmp_path)
    assert isinstance(loaded.features[2], Scale) and loaded.features[2].factor == 2.5


def test_load_model_errors(tmp_path: Path, base_builder: None) -> None:
    with pytest.raises(ModelError, match="architecture.json"):
        io.load_model(tmp_path)
    model = _build({"name": "net", "kwargs": {}})
    io.save_model(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="model.safetensors"):
        io.load_model(tmp_path)
    io.save_model(model, tmp_path)  # overwrite in place
    doc = json.loads((tmp_path / "architecture.json").read_text())
    doc["modules"]["fc"] = {"type": "Linear", "args": {"in_features": 8, "out_features": 7}}
    (tmp_path / "architecture.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="cannot load weights"):
        io.load_model(tmp_path)
    doc["modules"]["fc"] = {"type": "Warp", "args": {}}
    (tmp_path / "architecture.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="unknown module type 'Warp'"):
        io.load_model(tmp_path)
    doc["version"] = 99
    (tmp_path / "architecture.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="version 99"):
        io.load_model(tmp_path)
    (tmp_path / "architecture.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        io.load_model(tmp_path)


def test_sequential_child_order_survives(tmp_path: Path, base_builder: None) -> None:
    """JSON key order is execution order: 12 children must not come back as 0, 1, 10, 11, 2."""
    model = _build({"name": "net", "kwargs": {"width": 4}})
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    layers += [nn.Conv2d(4, 4, 1) if i % 2 else nn.ReLU() for i in range(11)]
    model.features = nn.Sequential(*layers)
    io.save_model(model, tmp_path)
    loaded = io.load_model(tmp_path)
    assert [type(m) for m in loaded.features] == [type(m) for m in layers]
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_real_models_and_kfe_bottleneck(tmp_path: Path) -> None:
    models = pytest.importorskip("eigendamage.models")
    eigenbasis = pytest.importorskip("eigendamage.surgery.eigenbasis")
    model = models.create_model("digits-resnet")
    model.conv1 = nn.Conv2d(1, 20, 3, padding=1, bias=False)  # stem thinned 32 -> 20 ...
    model.bn1 = nn.BatchNorm2d(20)
    block = model.layer1[0]
    block.conv1 = eigenbasis.KFEBottleneck(  # ... and the block's first conv in its eigenbasis
        nn.Conv2d(20, 12, 1, bias=False),
        nn.Conv2d(12, 9, 3, padding=1, bias=False),
        nn.Conv2d(9, 32, 1, bias=False),
    )
    block.conv2 = nn.Conv2d(32, 20, 3, padding=1, bias=False)
    block.bn2 = nn.BatchNorm2d(20)
    model.layer1[1].conv1 = nn.Conv2d(20, 64, 3, stride=2, padding=1, bias=False)
    model.layer1[1].downsample[0] = nn.Conv2d(20, 64, 1, stride=2, bias=False)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    io.save_model(model, tmp_path)
    loaded = io.load_model(tmp_path).eval()
    doc = json.loads((tmp_path / "architecture.json").read_text())
    assert doc["modules"]["layer1.0.conv1"]["type"] == "KFEBottleneck"
    assert doc["base"]["input_size"] == model.eigendamage_spec["input_size"]
    assert isinstance(loaded.layer1[0].conv1, eigenbasis.KFEBottleneck)
    assert torch.equal(loaded(x), expected)
