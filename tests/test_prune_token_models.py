"""``run_pruning`` on models whose input is not an image: Hugging Face token models fed dict
batches.  Counting and tracing run on the user's example (or the loader's first example,
token ids kept as integers), never on float zeros of an input shape."""

from __future__ import annotations

import pytest
import torch

import eigendamage as ed
from eigendamage.errors import ConfigError, ModelError
from eigendamage.methods.checks import infer_inputs

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 1000, 32, 8


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def loader() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=g),
        }
        for _ in range(4)
    ]


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(batch)).logits


@pytest.mark.parametrize(
    "method, budget",
    [
        ("eigendamage", {"ratio": 0.3}),
        ("l1", {"ratio": 0.3}),
        ("l1", {"target_flops": 0.6}),
    ],
)
def test_dict_batches_prune_with_no_extra_argument(bert, loader, method, budget):
    """The natural call: the example is the first batch's dict minus labels, one sequence."""
    before_logits = _logits(bert, loader[0])
    result = ed.run_pruning(bert, loader, method=method, fisher_batches=2, **budget)
    # the original model is untouched: its outputs are what they were
    assert torch.equal(_logits(bert, loader[0]), before_logits)
    one = {k: v[:1] for k, v in _inputs(loader[0]).items()}
    assert result.before.flops == ed.count(bert, example_inputs=one).flops
    assert result.after.params < result.before.params
    assert result.after.flops < result.before.flops
    assert result.after.flops == ed.count(result.model, example_inputs=one).flops
    assert _logits(result.model, loader[0]).shape == (BATCH, 2)
    if "target_flops" in budget:
        assert result.flops_kept <= budget["target_flops"] * 1.02


def test_explicit_example_inputs_are_used_as_given(bert, loader):
    """``example_inputs`` (here token ids alone) is what counting and tracing run on."""
    example = {"input_ids": loader[0]["input_ids"][:1]}
    result = ed.run_pruning(
        bert, loader, method="eigendamage", target_flops=0.7, fisher_batches=2,
        example_inputs=example,
    )  # fmt: skip
    assert result.before.flops == ed.count(bert, example_inputs=example).flops
    assert result.after.flops == ed.count(result.model, example_inputs=example).flops
    assert result.flops_kept <= 0.7 * 1.02
    assert _logits(result.model, loader[1]).shape == (BATCH, 2)


def test_token_id_pairs_keep_their_dtype(bert, loader):
    """``(ids, labels)`` batches: the example is the first row of ids, still integers."""
    pairs = [(b["input_ids"], b["labels"]) for b in loader]
    shape, example = infer_inputs(pairs)
    assert shape is None and example.dtype == torch.long
    assert torch.equal(example, loader[0]["input_ids"][:1])
    result = ed.run_pruning(bert, pairs, method="l1", ratio=0.3)
    assert result.after.flops < result.before.flops


def test_image_batches_behave_as_before():
    """Float tensors still give an input shape (counted on zeros), no example."""
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    assert infer_inputs(batches) == ((1, 3, 8, 8), None)
    dicts = [{"input_ids": torch.ones(4, 5, dtype=torch.long), "labels": torch.zeros(4)}]
    shape, example = infer_inputs(dicts)
    assert shape is None and set(example) == {"input_ids"}
    assert example["input_ids"].shape == (1, 5)


def test_input_shape_and_example_inputs_together_is_an_error(bert, loader):
    with pytest.raises(ConfigError, match="not both"):
        ed.run_pruning(
            bert, loader, method="l1", ratio=0.3, input_shape=(1, SEQ),
            example_inputs={"input_ids": loader[0]["input_ids"][:1]},
        )  # fmt: skip


def test_torch_pruning_breaking_attention_is_one_clear_error(bert, loader):
    """TP cuts BERT's query/key/value out of head alignment: a ModelError, not a bare
    RuntimeError from deep inside the forward."""
    pytest.importorskip("torch_pruning")
    with pytest.raises(ModelError, match="exclude="):
        ed.run_pruning(bert, loader, method="tp-l1", ratio=0.3)
