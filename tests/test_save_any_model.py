"""Issue 15, item 1 (and the file mode of item 9): ``save_model`` saves ANY pruned module,
and ``load_model(dir, model=fresh_instance)`` rebuilds it onto a fresh instance of its class
with identical outputs; a directory from a stranger stays data (no class it names is
imported); ``model.safetensors`` gets the mode of every other file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import eigendamage as ed
from eigendamage.errors import ModelError
from eigendamage.io import build_architecture, load_model, save_model

torchvision = pytest.importorskip("torchvision")

SHAPE = (1, 3, 16, 16)
METHODS = ["eigendamage", "l1"]


class Residual(nn.Module):
    """A user block: two convs and a residual add, not a type eigendamage knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + y)


class SmallNet(nn.Module):
    """A user-defined class: a describable stem, user blocks in a ModuleList, a head."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(Residual(width) for _ in range(blocks))
        self.mid = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(torch.relu(self.mid(x)).mean((2, 3)))


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, *SHAPE[1:], generator=g), torch.randint(0, 10, (4,), generator=g))] * 2


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fresh(kind: str) -> nn.Module:
    torch.manual_seed(1)  # the fresh instance's init must not matter: the file overrides it
    return torchvision.models.resnet18(num_classes=10) if kind == "resnet18" else SmallNet()


@pytest.fixture(scope="module")
def pruned() -> dict[tuple[str, str], nn.Module]:
    """Each (model, method) pruned once, lazily: EigenDamage on resnet18 takes seconds."""
    cache: dict[tuple[str, str], nn.Module] = {}

    def get(kind: str, method: str) -> nn.Module:
        if (kind, method) not in cache:
            torch.manual_seed(0)
            model = _fresh(kind)
            result = ed.run_pruning(
                model, _loader(), method=method, ratio=0.3, fisher_batches=1, input_shape=SHAPE
            )
            assert result.model is not model
            cache[kind, method] = result.model.eval()
        return cache[kind, method]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["resnet18", "user-class"])
def test_pruned_model_reloads_onto_a_fresh_instance(pruned, kind, method, tmp_path: Path):
    model = pruned(kind, method)
    changed = [n for n, m in model.named_modules() if isinstance(m, ed.KFEBottleneck)]
    assert _params(model) < _params(_fresh(kind)) and bool(changed) == (method == "eigendamage")
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        expected = model(x)
    save_model(model, tmp_path)
    doc = json.loads((tmp_path / "architecture.json").read_text())
    assert doc["base"]["class"] == type(model).__name__  # for messages; never imported

    fresh = _fresh(kind)
    loaded = load_model(tmp_path, model=fresh).eval()
    assert loaded is fresh and type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    if method == "eigendamage":
        assert all(isinstance(loaded.get_submodule(n), ed.KFEBottleneck) for n in changed)


def test_unchanged_modules_of_the_fresh_instance_are_kept(pruned, tmp_path: Path):
    save_model(pruned("resnet18", "l1"), tmp_path)
    fresh = _fresh("resnet18")
    maxpool, relu = fresh.maxpool, fresh.relu
    load_model(tmp_path, model=fresh)
    assert fresh.maxpool is maxpool and fresh.relu is relu  # not rebuilt: hooks survive


def test_missing_model_argument_says_what_to_pass(pruned, tmp_path: Path):
    save_model(pruned("user-class", "l1"), tmp_path)
    with pytest.raises(ModelError, match=r"model=<a fresh instance of SmallNet>"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match=r"model=<a fresh instance of SmallNet>"):
        ed.create_model(str(tmp_path))  # a name or a saved directory: same message
    with pytest.raises(ModelError, match="fresh instance"):
        build_architecture(json.loads((tmp_path / "architecture.json").read_text()))


@pytest.mark.parametrize(
    "wrong, match",
    [
        (lambda: torchvision.models.resnet18(num_classes=10), r"the root is a 'ResNet'"),
        (lambda: SmallNet(blocks=3), r"'blocks' \(ModuleList\) has children \['0', '1', '2'\]"),
        (lambda: SmallNet(blocks=1), r"'blocks' \(ModuleList\) has children \['0'\]"),
    ],
    ids=["another-class", "more-blocks", "fewer-blocks"],
)
def test_wrong_fresh_instance_is_refused_and_left_untouched(pruned, tmp_path, wrong, match):
    save_model(pruned("user-class", "l1"), tmp_path)
    fresh = wrong()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    modules = [type(m) for m in fresh.modules()]
    with pytest.raises(ModelError, match=rf"does not match the saved .*SmallNet: {match}"):
        load_model(tmp_path, model=fresh)
    assert [type(m) for m in fresh.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_same_class_with_other_parameter_shapes_is_refused(tmp_path: Path):
    """A kept module's own parameters come from the fresh instance: their shapes must fit."""

    class Scaled(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(width))
            self.fc = nn.Linear(width, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x * self.scale)

    save_model(Scaled(4), tmp_path)
    with pytest.raises(ModelError, match=r"scale.*is model= built with the arguments"):
        load_model(tmp_path, model=Scaled(5))
    loaded = load_model(tmp_path, model=Scaled(4))
    assert loaded.scale.shape == (4,)


def test_class_named_by_the_file_is_never_imported(pruned, tmp_path: Path):
    save_model(pruned("user-class", "l1"), tmp_path)
    doc = json.loads((tmp_path / "architecture.json").read_text())
    doc["base"] = {"class": "Payload", "module": "eigendamage_issue15_never_imported"}
    (tmp_path / "architecture.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="fresh instance of Payload"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, model=_fresh("user-class"))  # kept classes still match
    assert type(loaded) is SmallNet
    assert "eigendamage_issue15_never_imported" not in sys.modules


@pytest.mark.parametrize(
    "kept, match",
    [
        ({"": {"class": "SmallNet"}}, "'class', 'children'"),
        ({"": {"class": "SmallNet", "children": ["a", "a"]}}, "distinct names"),
        ({"": {"class": "SmallNet", "children": ["__class__"]}}, "child name"),
        ({"__dict__": {"class": "X", "children": []}}, "not a module path"),
        ({"": {"class": 7, "children": []}}, "not a class name"),
    ],
)
def test_malformed_kept_entries_are_refused(pruned, tmp_path: Path, kept, match):
    save_model(pruned("user-class", "l1"), tmp_path)
    doc = json.loads((tmp_path / "architecture.json").read_text())
    doc["kept"] = kept
    (tmp_path / "architecture.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=match):
        load_model(tmp_path, model=_fresh("user-class"))


def test_registry_models_stay_self_contained_and_accept_model(tmp_path: Path):
    torch.manual_seed(0)
    model = ed.create_model("tiny-mlp")
    model.eval()
    model.features[3] = nn.Linear(64, 7)
    model.classifier = nn.Linear(7, 10)
    save_model(model, tmp_path)
    doc = json.loads((tmp_path / "architecture.json").read_text())
    assert doc["base"]["name"] == "tiny-mlp" and "kept" not in doc
    x = torch.randn(2, 64)
    assert torch.equal(load_model(tmp_path).eval()(x), model(x))
    fresh = ed.create_model("tiny-mlp")
    assert torch.equal(load_model(tmp_path, model=fresh).eval()(x), model(x))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_file_gets_the_mode_of_every_other_file(tmp_path: Path, umask: int):
    old = os.umask(umask)
    try:
        save_model(SmallNet(width=4, blocks=1), tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"architecture.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}
