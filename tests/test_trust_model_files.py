"""A saved model directory may come from anyone (issue 12, items 2, 8 and 10).

Loading one must not run code from it (transformers' remote-code prompt), must not allocate
what its weights do not account for, and must refuse malformed or hostile architecture.json
documents with one ModelError -- through the API -- or one ``error:`` line with exit 2 and
nothing written -- through the CLI.  Memory-hungry cases run under an address-space limit so
that a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from eigendamage import io
from eigendamage.cli import main
from eigendamage.errors import ModelError
from eigendamage.io import module_specs
from eigendamage.models import create_model

BUDGET = ["--method", "l1", "--ratio", "0.3", "--finetune-epochs", "0", "--device", "cpu"]
HUGE_INT = "9" * 5000  # beyond Python's 4300-digit int parsing limit


@contextlib.contextmanager
def address_space_limit(extra: int = 3 << 29) -> Iterator[None]:
    """Allow ``extra`` bytes of new address space: a multi-GB allocation fails at once."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS is enforced on Linux only")
    import resource

    status = Path("/proc/self/status").read_text()
    vm = int(next(line for line in status.splitlines() if line.startswith("VmSize")).split()[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm * 1024 + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _small() -> nn.Module:
    torch.manual_seed(0)
    return create_model("digits-vgg", widths=(4, "M", 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "m"
    io.save_model(_small(), path)
    return path


def _doc(path: Path) -> dict[str, Any]:
    return json.loads((path / "architecture.json").read_text())


def _copy(saved: Path, to: Path, doc: dict[str, Any] | str | None = None) -> Path:
    shutil.copytree(saved, to)
    if doc is not None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        (to / "architecture.json").write_text(text)
    return to


# --------------------------------------------------------------------------- item 2

EVIL_CONFIG = {
    "model_type": "evilbert",
    "vocab_size": 10,
    "auto_map": {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
        "AutoModelForCausalLM": "evil.EvilModel",
    },
}
EVIL_CODE = """\
open({marker!r}, "w").write("ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evilbert"
"""
SCRIPT = """\
import json
import eigendamage as ed
from eigendamage.cli import main
from eigendamage.errors import ModelError

results = {}
try:
    ed.load_model("saved")
    results["api"] = "loaded"
except ModelError as exc:
    results["api"] = str(exc)
results["export"] = main(["export", "saved", "out.onnx"])
results["prune"] = main(["prune", "--checkpoint", "saved", *%r, "--out", "run"])
results["latency"] = main(["bench", "latency", "--model", "saved", "--batch-size", "1",
                           "--warmup", "0", "--repeats", "1", "--rounds", "1", "--device", "cpu"])
try:  # not a saved model: transformers itself must be told not to run the directory's code
    ed.create_model("hf:evil")
    results["direct"] = "built"
except ModelError as exc:
    results["direct"] = str(exc)
print("RESULTS", json.dumps(results))
"""


def test_hf_base_naming_a_local_directory_never_runs_its_code(saved: Path, tmp_path: Path) -> None:
    """An ``hf:<dir>`` base whose config.json has ``auto_map`` and a .py beside it: with
    stdin answering "y" to any prompt, no code runs and no prompt is shown."""
    marker = tmp_path / "PWNED"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(json.dumps(EVIL_CONFIG))
    (tmp_path / "evil" / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    doc = _doc(saved)
    doc["base"] = {"name": "hf:evil", "kwargs": {"num_classes": 2}}
    _copy(saved, tmp_path / "saved", doc)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT % (BUDGET,)],
        cwd=tmp_path,
        input="y\n" * 20,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert not marker.exists(), f"the directory's code ran:\n{output[-2000:]}"
    assert "Do you wish to run the custom code" not in output
    assert proc.returncode == 0, output[-2000:]
    results = json.loads(output.split("RESULTS ", 1)[1].splitlines()[0])
    assert "may not reference local HF directories" in results["api"]
    assert (results["export"], results["prune"], results["latency"]) == (2, 2, 2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all("local HF directories" in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "trust_remote_code" in results["direct"] or "custom code" in results["direct"]
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "run").exists()


def test_torchvision_backbone_weights_are_never_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection models default to an ImageNet backbone download; a saved spec naming one
    must not reach the network."""
    from torchvision.models import _api

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"download attempted: {args[:1]}")

    monkeypatch.setattr(_api, "load_state_dict_from_url", refuse)
    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    with torch.device("meta"):
        model = create_model(name, num_classes=3)
    assert "weights_backbone" not in model.eigendamage_spec["kwargs"]
    with pytest.raises(ModelError, match="'weights_backbone' is not supported"):
        create_model(name, weights_backbone="DEFAULT")


def test_builders_that_need_real_tensors_still_load(tmp_path: Path) -> None:
    """torchvision's RegNet computes its widths with ``.tolist()``, which fails on the meta
    device: the size check falls back to putting only large tensors there."""
    with pytest.raises(NotImplementedError), torch.device("meta"):  # the premise
        create_model("torchvision:regnet_x_400mf")
    torch.manual_seed(0)
    model = create_model("torchvision:regnet_x_400mf", num_classes=3).eval()
    model.fc = nn.Linear(400, 3)
    io.save_model(model, tmp_path / "m")
    loaded = io.load_model(tmp_path / "m").eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_saved_model_may_name_neither_another_model_dir_nor_itself(
    saved: Path, tmp_path: Path
) -> None:
    target = _copy(saved, tmp_path / "m")
    doc = _doc(saved)
    doc["base"] = {"name": str(target), "kwargs": {}}  # itself: would recurse forever
    (target / "architecture.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="saved model directory"):
        io.load_model(target)


# --------------------------------------------------------------------------- item 8


def test_declared_layer_sizes_are_checked_against_the_weights_before_building(
    saved: Path, tmp_path: Path
) -> None:
    """A 1 KB-weights file declaring a 6 GB classifier: refused before any allocation."""
    doc = _doc(saved)
    doc["modules"]["classifier"] = {
        "type": "Linear",
        "args": {"in_features": 8, "out_features": 200_000_000, "bias": True},
    }
    target = _copy(saved, tmp_path / "m", doc)
    with address_space_limit(), pytest.raises(ModelError, match="cannot load weights") as info:
        io.load_model(target)
    assert "classifier.weight" in str(info.value) and "200000000" in str(info.value)


def test_huge_base_is_refused_before_building(saved: Path, tmp_path: Path) -> None:
    """Base kwargs make a 14 GB base whose every layer the modules then replace with the
    small ones the weights fit: the base would still be built in full."""
    small = _small()
    doc = _doc(saved)
    doc["base"]["kwargs"]["widths"] = [20000, "M", 20000]
    doc["modules"] = {
        "features": module_specs._describe(small.features, "features"),
        "classifier": module_specs._describe(small.classifier, "classifier"),
    }
    target = _copy(saved, tmp_path / "m", doc)
    with address_space_limit(), pytest.raises(ModelError, match="base model 'digits-vgg'"):
        io.load_model(target)
    doc["base"]["kwargs"]["widths"] = [4, "M", 8]  # the same file with a sane base loads
    (target / "architecture.json").write_text(json.dumps(doc))
    loaded = io.load_model(target)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), small.eval()(x))


def test_a_tie_cannot_hide_a_huge_module(saved: Path, tmp_path: Path) -> None:
    """The tie replaces the huge weight after it was built: bytes are counted as built."""
    doc = _doc(saved)
    args = {"in_features": 30000, "out_features": 30000, "bias": False}  # 3.6 GB
    doc["modules"]["extra"] = {"type": "Linear", "args": args}
    doc["tied"] = {"extra.weight": "classifier.weight"}
    target = _copy(saved, tmp_path / "m", doc)
    with address_space_limit(), pytest.raises(ModelError, match="described modules"):
        io.load_model(target)


# --------------------------------------------------------------------------- item 10


def _deep_children(depth: int) -> str:
    inner = '{"type": "Identity"}'
    for _ in range(depth):
        inner = '{"type": "Sequential", "children": {"0": ' + inner + "}}"
    return inner


def _mutate(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any] | str]:
    def apply(doc: dict[str, Any]) -> dict[str, Any] | str:
        doc[key] = value
        return doc

    return apply


def _module(path: str, desc: Any) -> Callable[[dict[str, Any]], dict[str, Any] | str]:
    def apply(doc: dict[str, Any]) -> dict[str, Any] | str:
        doc["modules"][path] = desc
        return doc

    return apply


def _text(make: Callable[[str], str]) -> Callable[[dict[str, Any]], dict[str, Any] | str]:
    return lambda doc: make(json.dumps(doc))


LINEAR = {"in_features": 8, "out_features": 10, "bias": True}
HOSTILE: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any] | str], str]] = [
    ("deep-json", _text(lambda t: t[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nested too deeply"),  # noqa: E501
    ("deep-children", _text(lambda t: t.replace('"modules": {}', '"modules": {"features": ' + _deep_children(3000) + "}")), "nested"),  # noqa: E501
    ("deep-children-150", _text(lambda t: t.replace('"modules": {}', '"modules": {"features": ' + _deep_children(150) + "}")), "nested deeper than 200"),  # noqa: E501
    ("deep-children-70", _text(lambda t: t.replace('"modules": {}', '"modules": {"features": ' + _deep_children(70) + "}")), "deeper than 64 containers"),  # noqa: E501
    ("huge-int", _text(lambda t: t.replace('"version": 1', '"version": ' + HUGE_INT)), "cannot read"),  # noqa: E501
    ("nan", _module("classifier", {"type": "Linear", "args": {**LINEAR, "bias": float("nan")}}), "non-finite"),  # noqa: E501
    ("modules-list", _mutate("modules", [1, 2]), "'modules' must be an object"),
    ("attributes-string", _mutate("attributes", "x"), "'attributes' must be an object"),
    ("tied-list", _mutate("tied", [["a", "b"]]), "'tied' must be an object"),
    ("children-list", _module("features", {"type": "Sequential", "children": [1]}), "'children' of 'features' must be an object"),  # noqa: E501
    ("args-list", _module("classifier", {"type": "Linear", "args": [8, 10]}), "'args' of 'classifier' must be an object"),  # noqa: E501
    ("dunder-module", _module("__class__", {"type": "Identity"}), "'__class__'"),
    ("private-module", _module("features._modules", {"type": "Identity"}), "features._modules"),
    ("replace-forward", _module("forward", {"type": "Identity"}), "'forward' is not a child module"),  # noqa: E501
    ("remove-forward", _module("forward", None), "'forward' is not a child module"),
    ("module-over-parameter", _module("classifier.weight", {"type": "Identity"}), "not a child module"),  # noqa: E501
    ("dunder-child", _module("features", {"type": "Sequential", "children": {"__init__": {"type": "Identity"}}}), "'__init__'"),  # noqa: E501
    ("tie-onto-forward", _mutate("tied", {"classifier.forward": "classifier.weight"}), "not a parameter"),  # noqa: E501
    ("tie-onto-attribute", _mutate("tied", {"classifier.in_features": "classifier.weight"}), "not a parameter"),  # noqa: E501
    ("tie-dunder", _mutate("tied", {"__class__": "classifier.weight"}), "'__class__'"),
    ("attribute-dunder", _mutate("attributes", {"classifier": {"__class__": 1}}), "refused"),
    ("attribute-new", _mutate("attributes", {"classifier": {"num_heads": 2}}), "refused"),
    ("args-device-meta", _module("classifier", {"type": "Linear", "args": {**LINEAR, "device": "meta"}}), "'device'"),  # noqa: E501
    ("args-dtype", _module("classifier", {"type": "Linear", "args": {**LINEAR, "dtype": "float16"}}), "'dtype'"),  # noqa: E501
    ("args-unknown-kwarg", _module("classifier", {"type": "Linear", "args": {**LINEAR, "factory_kwargs": 1}}), "'factory_kwargs'"),  # noqa: E501
    ("args-object-value", _module("classifier", {"type": "Linear", "args": {**LINEAR, "bias": {"a": 1}}}), "JSON scalar"),  # noqa: E501
    ("version-true", _mutate("version", True), "version True"),
    ("base-kwargs-device", lambda d: {**d, "base": {**d["base"], "kwargs": {**d["base"]["kwargs"], "device": "meta"}}}, "'device'"),  # noqa: E501
    ("inside-described", lambda d: {**d, "modules": {"features": module_specs._describe(_small().features, "features"), "features.2": None}}, "lies inside"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "fragment"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_architecture_is_one_model_error(
    mutate: Callable[[dict[str, Any]], dict[str, Any] | str],
    fragment: str,
    saved: Path,
    tmp_path: Path,
) -> None:
    target = _copy(saved, tmp_path / "m", mutate(_doc(saved)))
    with address_space_limit(), pytest.raises(ModelError) as info:
        io.load_model(target)
    assert fragment in str(info.value)
    assert "architecture.json" in str(info.value)


CLI_CASES = ["deep-json", "deep-children", "modules-list", "dunder-module", "tie-onto-forward",
             "args-device-meta", "huge-int"]  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}  # fmt: skip  # noqa: E501


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err[-2000:]!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize("command", ["export", "prune"])
def test_hostile_architecture_through_the_cli(
    case: str,
    command: str,
    saved: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mutate, fragment = next(c[1:] for c in HOSTILE if c[0] == case)
    _copy(saved, tmp_path / "m", mutate(_doc(saved)))
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    args = {
        "export": ["export", "m", "out.onnx"],
        "prune": ["prune", "--checkpoint", "m", *BUDGET, "--out", "o"],
    }[command]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert fragment in line and "architecture.json" in line
    assert _tree(tmp_path) == before, "a failed run wrote or changed files"


def test_default_input_shape_reads_a_model_dir_through_the_checks(
    saved: Path, tmp_path: Path
) -> None:
    from eigendamage.io import input_shape_of as default_input_shape

    assert default_input_shape(str(saved), batch_size=2) == (2, 1, 8, 8)
    mutate = next(c[1] for c in HOSTILE if c[0] == "deep-json")
    target = _copy(saved, tmp_path / "m", mutate(_doc(saved)))
    with pytest.raises(ModelError, match="nested too deeply"):
        default_input_shape(str(target))


# --------------------------------------------------------------------------- fuzzing

NAMES = ["", "features", "features.0", "features.1", "features.4", "features.7", "pool",
         "classifier", "classifier.weight", "extra", "forward", "__class__", "_modules",
         "features.__dict__", "training", "features..0", "0", "a.b.c"]  # fmt: skip
ARG_NAMES = ["in_features", "out_features", "bias", "in_channels", "out_channels",
             "kernel_size", "padding", "stride", "groups", "num_features", "eps", "p",
             "inplace", "normalized_shape", "output_size", "start_dim", "device", "dtype",
             "__class__", "factory_kwargs"]  # fmt: skip
TYPES = [*module_specs._REGISTRY, "KFEBottleneck", "Warp", "__import__", "os.system", ""]
ints = st.one_of(
    st.integers(-2, 16),
    st.integers(10**5, 10**12),
    st.integers(-2, 16),
    st.just(10**40),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=6),
    st.just("@HUGE@"),  # replaced by a 5000-digit literal in the JSON text
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(NAMES + ARG_NAMES) | st.text(max_size=5), inner, max_size=3
        )
    ),
    max_leaves=8,
)
args = st.dictionaries(
    st.sampled_from(ARG_NAMES), st.one_of(scalars, st.lists(ints, max_size=3)), max_size=4
)
leaf = st.fixed_dictionaries({"type": st.sampled_from(TYPES)}, optional={"args": args})
descs = st.recursive(
    leaf,
    lambda inner: st.fixed_dictionaries(
        {
            "type": st.sampled_from(["Sequential", "KFEBottleneck", "Linear"]),
            "children": st.dictionaries(
                st.sampled_from(["0", "1", "rot_in", "core", "rot_out", "_x"]), inner, max_size=3
            ),
        },
        optional={"args": args},
    ),
    max_leaves=6,
)
spec_kwargs = st.dictionaries(
    st.sampled_from(["widths", "num_classes", "in_channels", "hidden", "device"]),
    json_values,
    max_size=2,
)
random_spec = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["digits-vgg", "tiny-mlp", "nope", ".", "hf:.", "torchvision:x"]),
        "kwargs": spec_kwargs,
    }
)
_SMALL = _small()
# Entries that describe the saved model as it is: documents made of these load.
VALID = [
    (p, module_specs._describe(m, p))
    for p, m in _SMALL.named_modules()
    if module_specs._lookup(m) is not None
]
module_maps = st.one_of(
    st.dictionaries(st.sampled_from(NAMES), st.none() | descs, max_size=3),
    st.lists(st.sampled_from(VALID), max_size=3).map(dict),
    st.lists(st.sampled_from(VALID) | st.tuples(st.sampled_from(NAMES), descs), max_size=3).map(
        dict
    ),
)


@st.composite
def docs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed at the top, so that the deeper checks are reached too."""
    # one_of leans towards its first branch (hypothesis favours simple choices)
    doc: dict[str, Any] = {
        "base": draw(st.one_of(st.just("keep"), random_spec, json_values)),
        "modules": draw(st.one_of(module_maps, json_values)),
    }
    if draw(st.booleans()):
        doc["tied"] = draw(
            st.dictionaries(st.sampled_from(NAMES), st.sampled_from(NAMES) | json_values)
            | json_values
        )
    if draw(st.booleans()):
        doc["attributes"] = draw(
            st.dictionaries(
                st.sampled_from(NAMES),
                st.dictionaries(st.sampled_from(["num_heads", "forward", "__class__"]), ints)
                | json_values,
                max_size=2,
            )
        )
    junk = st.tuples(st.sampled_from(["format", "version", "junk"]), json_values)
    override = draw(st.one_of(st.none(), st.none(), st.none(), junk))
    if override is not None:
        doc[override[0]] = override[1]
    return doc


deep = st.tuples(st.integers(60, 3000), st.sampled_from(["children", "list", "dict"]))


def _render(doc: dict[str, Any], deep_part: tuple[int, str] | None, original: dict) -> str:
    """The document as JSON text; a deep part is appended as a later key (JSON's last
    duplicate key wins), because ``json.dumps`` itself cannot nest that deep."""
    doc = {"format": original["format"], "version": original["version"], **doc}
    if doc["base"] == "keep":
        doc["base"] = original["base"]
    text = json.dumps(doc).replace('"@HUGE@"', HUGE_INT)
    if deep_part is None:
        return text
    depth, kind = deep_part
    value = {
        "children": '{"features": ' + _deep_children(depth) + "}",
        "list": "[" * depth + "]" * depth,
        "dict": '{"a": ' * depth + "1" + "}" * depth,
    }[kind]
    return text[:-1] + f', "modules": {value}' + "}"


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=docs(), deep_part=st.none() | st.none() | deep)
def test_fuzzed_architecture_loads_or_is_one_model_error(
    saved: Path, tmp_path: Path, doc: dict[str, Any], deep_part: tuple[int, str] | None
) -> None:
    """Whatever architecture.json holds, ``load_model`` returns a real CPU model whose
    weights are exactly the file's, or raises ModelError; within a bounded address space."""
    original = _doc(saved)
    target = tmp_path / "m"
    if not target.exists():
        shutil.copytree(saved, target)
    (target / "architecture.json").write_text(_render(doc, deep_part, original))
    with address_space_limit():
        try:
            model = io.load_model(target)
        except ModelError as exc:
            assert str(exc).strip()
            event("refused: " + " ".join(str(exc).replace(str(target), "M").split()[:5]))
            return
    event("loaded")
    weights = load_file(saved / "model.safetensors")
    state = model.state_dict()
    assert set(weights) <= set(state)
    assert all(t.device.type == "cpu" for t in state.values())
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in weights.items())


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=docs(), deep_part=st.none() | deep, command=st.sampled_from(["export", "prune"]))
def test_fuzzed_architecture_through_the_cli(
    saved: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    doc: dict[str, Any],
    deep_part: tuple[int, str] | None,
    command: str,
) -> None:
    """Through the CLI: exit 2 (3 for resources) and one ``error:`` line, nothing written;
    documents that happen to load are skipped (they would run a whole export or prune)."""
    original = _doc(saved)
    work = tmp_path / "cli"
    shutil.rmtree(work, ignore_errors=True)
    _copy(saved, work / "m", _render(doc, deep_part, original))
    try:
        with address_space_limit():
            io.load_model(work / "m")
        return
    except ModelError:
        pass
    capsys.readouterr()
    before = _tree(work)
    args = {
        "export": ["export", str(work / "m"), str(work / "out.onnx")],
        "prune": ["prune", "--checkpoint", str(work / "m"), *BUDGET, "--out", str(work / "o")],
    }[command]
    with address_space_limit():
        code = main(args)
    assert code in (2, 3)
    _one_error_line(capsys.readouterr().err)
    assert _tree(work) == before, "a failed run wrote or changed files"
