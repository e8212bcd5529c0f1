"""The public API composes: seeded models, ``ed.evaluate``, ``ed.train_model``, a short
``Counts``, and the README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import eigendamage as ed
import eigendamage.train
from eigendamage.config import TrainConfig
from eigendamage.errors import ModelError
from eigendamage.measure import Counts
from eigendamage.models import create_model
from eigendamage.runner import MODEL_DIR, run_train

README = Path(__file__).resolve().parents[1] / "README.md"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- seeded models


@pytest.mark.parametrize("build", [create_model, ed.create_model], ids=["models", "root"])
def test_the_same_call_builds_the_same_weights_and_leaves_the_global_rng(build: Any) -> None:
    state = torch.random.get_rng_state()
    a, b = build("digits-vgg"), build("digits-vgg")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(a, b)
    assert _same_weights(build("digits-vgg", seed=1), build("digits-vgg", seed=1))
    assert not _same_weights(a, build("digits-vgg", seed=1))


def test_seed_none_draws_from_the_global_rng_as_before() -> None:
    torch.manual_seed(0)
    a = create_model("tiny-mlp", seed=None)
    b = create_model("tiny-mlp", seed=None)  # the RNG moved on
    assert not _same_weights(a, b)
    assert _same_weights(a, create_model("tiny-mlp", seed=0))  # seed=0 == manual_seed(0)


def test_the_seed_is_not_part_of_the_saved_spec() -> None:
    assert (
        create_model("tiny-mlp", seed=3).eigendamage_spec
        == create_model("tiny-mlp").eigendamage_spec
    )


def test_a_source_model_is_seeded_too() -> None:
    pytest.importorskip("torchvision")
    a = create_model("torchvision:squeezenet1_0", num_classes=4)
    assert _same_weights(a, create_model("torchvision:squeezenet1_0", num_classes=4))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "0", True])
def test_a_bad_seed_is_a_model_error(seed: Any) -> None:
    with pytest.raises(ModelError, match="seed must be an integer"):
        create_model("tiny-mlp", seed=seed)


def test_training_runs_take_their_weights_from_the_run_seed(tmp_path: Path) -> None:
    def trained(seed: int) -> nn.Module:
        cfg = TrainConfig(model="tiny-mlp", epochs=0, seed=seed, device="cpu")
        run_train(cfg, tmp_path / f"s{seed}", log=lambda _: None)
        return ed.load_model(tmp_path / f"s{seed}" / MODEL_DIR)

    first = trained(0)
    assert _same_weights(first, create_model("tiny-mlp", in_channels=1))
    assert not _same_weights(first, trained(1))


# --------------------------------------------------------------------------- the root API


def test_evaluate_and_train_model_are_at_the_root_and_the_subpackage_is_not_hidden() -> None:
    assert ed.evaluate is eigendamage.train.evaluate
    assert ed.train_model is eigendamage.train.train
    assert ed.EvalResult is eigendamage.train.EvalResult
    assert ed.train.__name__ == "eigendamage.train"  # a module, not the function
    assert all(hasattr(ed, name) for name in ed.__all__)


def test_counts_print_as_their_totals_and_keep_the_per_layer_detail() -> None:
    counts = ed.count(create_model("digits-vgg"))
    assert str(counts) == f"params {counts.params:,}; FLOPs (MACs) {counts.flops:,}"
    assert repr(counts) == (
        f"Counts(params={counts.params}, flops={counts.flops}, "
        f"per_layer=<{len(counts.per_layer)} layers>)"
    )
    assert len(counts.per_layer) > 5 and "\n" not in repr(counts)
    assert counts.to_dict()["params"] == counts.params
    assert counts == Counts(counts.params, counts.flops, dict(counts.per_layer))


# --------------------------------------------------------------------------- the README


def _run_example(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)  # it writes pruned/
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README example", "exec"), namespace)
    model, loaders = namespace["model"], namespace["loaders"]
    assert ed.evaluate(model, loaders.test).accuracy > 0.9  # it was trained
    result, same = namespace["result"], namespace["same"]
    assert ed.evaluate(result.model, loaders.test).accuracy > 0.8  # and fine-tuned
    assert result.after.flops <= 0.25 * result.before.flops * 1.01
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.eval()(x), result.model.eval()(x))
    return namespace


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Use it\n", 1)[1]
    match = re.search(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert match, "README.md: no ```python block under '## Use it'"
    return match.group(1)


def test_the_readme_python_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_example(_readme_example(), tmp_path, monkeypatch)
