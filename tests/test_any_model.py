"""Any model: torchvision, timm and transformers sources, the EigenDamage target policy
(weight sharing, functional weights, custom forwards), token-level Fisher for LMs, and
save/load round trips that rebuild the original classes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from eigendamage.criteria.eigendamage import (
    apply_plan,
    direction_scores,
    eigendamage_targets,
    plan_pruning,
    rotated_layers,
    target_policy,
)
from eigendamage.curvature import collect_kfac, eigendecompose
from eigendamage.errors import ModelError
from eigendamage.io import load_model, save_model
from eigendamage.io import load_or_create as create_model
from eigendamage.methods import run_pruning
from eigendamage.models.registry import example_input
from eigendamage.surgery.eigenbasis import KFEBottleneck, to_eigenbasis

transformers = pytest.importorskip("transformers")

TINY_BERT = dict(
    num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50
)
TINY_GPT2 = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: one thread is fastest and spares parallel tests
    yield
    torch.set_num_threads(threads)


def eigendamage_once(model: nn.Module, loader: list, x: torch.Tensor, ratio: float = 0.5):
    """One EigenDamage round from the criteria functions (what ``eigendamage_round`` does),
    for token models whose FLOPs ``run_pruning`` cannot count on a float input."""
    targets = eigendamage_targets(model, {"lm_head", "classifier", "score"}, example_inputs=x)
    kfe = eigendecompose(
        collect_kfac(model, loader, conv_mode="channel", modules=targets), drop_bias=True
    )
    rotated = rotated_layers(model, kfe)
    scores = {n: direction_scores(rotated[n], kfe[n]) for n in kfe}
    plan = plan_pruning(rotated, scores, ratio=ratio)
    return apply_plan(copy.deepcopy(model), rotated, plan), kfe


def assert_roundtrip(model: nn.Module, x: torch.Tensor, tmp_path: Path, cls: type) -> nn.Module:
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is cls
    with torch.no_grad():
        a, b = model.eval()(x), loaded(x)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert torch.equal(a, b)
    return loaded


# --------------------------------------------------------------------------- sources


def test_gpt2_conv1d_becomes_an_equivalent_linear():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = create_model("hf-lm:gpt2", **TINY_GPT2).eval()
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives
    reference = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    with torch.no_grad():  # copy HF's Conv1D weights in, transposed
        state = {
            k: v.T if v.dim() == 2 and "c_" in k and "weight" in k else v
            for k, v in reference.state_dict().items()
        }
        model.load_state_dict(state)
        x = example_input(model, 2)
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=1e-6)
    spec = model.eigendamage_spec
    assert spec["input_kind"] == "tokens" and spec["vocab_size"] == 50
    assert spec["input_size"] == [16]


def test_hf_names_fields_and_local_directories(tmp_path: Path):
    bert = create_model("hf:google-bert/bert-base-uncased", num_classes=3, **TINY_BERT)
    assert type(bert).__name__ == "BertForSequenceClassification"
    assert bert.classifier.out_features == 3
    with pytest.raises(ModelError, match="hidden_sise"):
        create_model("hf:bert", hidden_sise=3)
    with pytest.raises(ModelError, match="Did you mean 'bert'"):
        create_model("hf:bertt")
    # A local directory: the spec embeds the whole config, so the directory is not needed
    # to load the saved model again.
    config = transformers.GPT2Config(**TINY_GPT2)
    config.save_pretrained(tmp_path / "cfg")
    model = create_model(f"hf:{tmp_path / 'cfg'}", num_classes=4, n_head=4)
    assert model.config.n_head == 4 and model.score.out_features == 4
    save_model(model, tmp_path / "saved")
    (tmp_path / "cfg" / "config.json").unlink()
    loaded = load_model(tmp_path / "saved")
    x = example_input(model, 2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)
    # and a saved directory is a model name of its own
    again = create_model(str(tmp_path / "saved"))
    assert type(again) is type(model)
    with pytest.raises(ModelError, match="no extra arguments"):
        create_model(str(tmp_path / "saved"), depth=3)


# --------------------------------------------------------------------------- policy


class _FunctionalAttention(nn.Module):
    """Uses its Linear's weight as a bare tensor (like torchvision's Swin)."""

    def __init__(self, d: int):
        super().__init__()
        self.qkv = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qkv.weight, self.qkv.bias)


class _StandardisedConv(nn.Conv2d):
    """A conv whose forward is not the plain one (like timm's StdConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.std = _StandardisedConv(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.twice = nn.Conv2d(8, 8, 1)  # called twice: supported
        self.alias = nn.Conv2d(8, 8, 1)
        self.shared = self.alias  # one module under two names
        self.fc = nn.Linear(8, 16)
        self.functional = _FunctionalAttention(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.tied = nn.Linear(16, 16)
        self.tied_twin = nn.Linear(16, 16)
        self.tied_twin.weight = self.tied.weight
        self.aux = nn.Linear(16, 5)  # training-only head
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(self.std(self.stem(x))))
        x = self.twice(torch.relu(self.twice(x)))
        x = self.shared(x)
        h = self.functional(self.fc(x.mean((2, 3)))).unsqueeze(1)
        h = self.mha(h, h, h, need_weights=False)[0].squeeze(1)
        h = self.tied(h) + self.tied_twin(h)
        if self.training:
            h = h + self.aux(h).sum()
        return self.head(h)


def test_policy_names_every_layer_left_dense_and_prunes_the_rest():
    torch.manual_seed(0)
    model = _Zoo().eval()
    x = torch.randn(4, 3, 6, 6)
    targets, skipped = target_policy(model, {"head"}, example_inputs=x[:1])
    assert targets == ["stem", "twice", "fc"]
    reasons = {name: reason.split(" (")[0].split(",")[0] for name, reason in skipped.items()}
    assert reasons == {
        "std": "_StandardisedConv overrides forward",
        "dw": "grouped conv",
        "alias": "shared module",
        "mha.out_proj": "inside nn.MultiheadAttention",
        "tied": "tied parameter",
        "tied_twin": "tied parameter",
        "functional.qkv": "never called as a module in the forward pass",
        "aux": "never called as a module in the forward pass",
    }
    # Without a probe input (and no spec), only the static rules apply.
    assert "aux" in eigendamage_targets(model, {"head"})
    # The whole loop runs and stays exact where it should: the twice-called conv is
    # replaced once and serves both calls.
    loader = [(x, torch.randint(0, 5, (4,)))]
    factors = collect_kfac(model, loader, conv_mode="channel", modules=targets)
    rotated = to_eigenbasis(model, eigendecompose(factors, drop_bias=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), model(x), atol=1e-5, rtol=1e-4)
    assert isinstance(rotated.twice, KFEBottleneck) and rotated.shared is rotated.alias


def test_torchvision_vit_keeps_attention_dense_and_prunes_its_mlps():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    x = torch.randn(3, 3, 16, 16)
    targets, skipped = target_policy(vit, {"heads.head"}, example_inputs=x[:1])
    assert set(targets) == {"conv_proj", "encoder.layers.encoder_layer_0.mlp.0",
                            "encoder.layers.encoder_layer_0.mlp.3"}  # fmt: skip
    assert list(skipped) == ["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    result = run_pruning(vit, [(x, torch.zeros(3, dtype=torch.long))], ratio=0.4,
                         input_shape=(1, 3, 16, 16))  # fmt: skip
    assert result.after.params < result.before.params


# --------------------------------------------------------------------------- transformers


def test_language_model_fisher_is_token_level_and_ignores_minus_100():
    torch.manual_seed(0)
    model = create_model("hf-lm:gpt2", **TINY_GPT2).eval()
    ids = example_input(model, 2)
    names = ["transformer.h.0.mlp.c_fc"]
    true = collect_kfac(model, [(ids, ids)], modules=names, conv_mode="channel")
    assert true[names[0]].S.shape == (128, 128) and true[names[0]].S.abs().sum() > 0
    ignored = torch.full_like(ids, -100)
    empirical = collect_kfac(model, [(ids, ignored)], fisher="empirical", modules=names)
    assert empirical[names[0]].S.abs().sum() == 0  # every token ignored: no gradient
    half = ignored.clone()
    half[:, :8] = ids[:, 1:9]  # labels shifted by the caller, HF-style -100 elsewhere
    partial = collect_kfac(model, [(ids, half)], fisher="empirical", modules=names)
    assert partial[names[0]].S.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "kwargs"), [("hf-lm:gpt2", TINY_GPT2), ("hf:bert-base-uncased", TINY_BERT)]
)
def test_transformers_prune_exactly_and_round_trip(name, kwargs, tmp_path: Path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).eval()
    x = example_input(model, 4)
    y = x if name.startswith("hf-lm") else torch.randint(0, 3, (4,))
    pruned, kfe = eigendamage_once(model, [(x, y)], x[:1])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert not any("lm_head" in n or n == "classifier" for n in kfe)
    with torch.no_grad():
        rotated = to_eigenbasis(model, kfe).eval()
        torch.testing.assert_close(rotated(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
    loaded = assert_roundtrip(pruned, x, tmp_path, type(model))
    if name.startswith("hf-lm"):
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


# --------------------------------------------------------------------------- vision


def test_pruned_timm_vit_loads_back_as_its_class(tmp_path: Path):
    """(The torchvision ResNet-18 round trip is in test_export.py, with its ONNX parity.)"""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model("timm:vit_tiny_patch16_224", depth=1, img_size=32).eval()
    assert model.eigendamage_spec["input_size"] == [3, 32, 32]
    x = example_input(model, 2)
    result = run_pruning(model, [(x, torch.zeros(2, dtype=torch.long))], ratio=0.5)
    assert any(isinstance(m, KFEBottleneck) for m in result.model.modules())
    assert_roundtrip(result.model, x, tmp_path, type(model))
