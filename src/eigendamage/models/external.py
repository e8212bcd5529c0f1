"""Models from torchvision, timm and Hugging Face transformers, always built without
pretrained weights (no network: HF architectures come from config classes bundled with
``transformers`` or from a local directory's ``config.json``).

Sources:

* ``torchvision:<name>`` -- any ``torchvision.models`` builder;
* ``timm:<name>`` -- any timm model;
* ``hf:<name>`` -- a sequence classifier (``AutoModelForSequenceClassification``,
  ``num_labels=num_classes``); ``hf-lm:<name>`` -- a causal LM (``AutoModelForCausalLM``).
  ``<name>`` is a well-known checkpoint name (:data:`HF_KNOWN`, mapped to its config's
  hyper-parameters), any ``model_type`` of ``transformers`` (``bert``, ``gpt2``, ...) or a
  local directory holding a ``config.json``.  Extra keyword arguments override config fields
  (``num_hidden_layers=2``), and unknown fields are rejected (HF would silently keep them).

Why GPT-2's ``Conv1D`` layers become ``nn.Linear``: ``transformers.pytorch_utils.Conv1D`` is
a Linear layer with its weight stored transposed (``y = x @ weight + bias``).  Converting it
at build time (``Linear.weight = Conv1D.weight.T``, the same function) lets K-FAC, EigenDamage
surgery, channel pruning, saving and export treat it as the Linear layer it is: most of
GPT-2's parameters live there.  A state dict from HF must be transposed accordingly
(:func:`linearize_conv1d` converts a model built elsewhere).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, unknown_name
from ._common import check_positive_int

SOURCES = ("torchvision", "timm", "hf", "hf-lm")
DEFAULT_SEQ_LEN = 128

# Well-known checkpoint names -> (model_type, config fields that differ from its defaults).
HF_KNOWN: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-base-uncased": ("bert", {}),
    "bert-base-cased": ("bert", {"vocab_size": 28996}),
    "bert-large-uncased": (
        "bert",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
    ),
    "distilbert-base-uncased": ("distilbert", {}),
    "roberta-base": (
        "roberta",
        {
            "vocab_size": 50265,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    ),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "distilgpt2": ("gpt2", {"n_layer": 6}),
}
# Hub organisation prefixes of the names above (``openai-community/gpt2`` is ``gpt2``).
_HF_ORGS = ("google-bert/", "openai-community/", "distilbert/", "FacebookAI/")


@dataclass
class External:
    """A built model and what its spec must record to rebuild it.

    ``spec_kwargs`` replace the caller's kwargs in the spec (e.g. the full config of a local
    HF directory, so that a saved model rebuilds without that directory); ``spec_extra``
    adds keys such as the token input kind and vocabulary size.
    """

    model: nn.Module
    input_size: tuple[int, ...]
    spec_kwargs: dict[str, Any]
    spec_extra: dict[str, Any] = field(default_factory=dict)


def create_external(
    name: str, num_classes: int, in_channels: int | None, kwargs: dict[str, Any]
) -> External:
    """Build ``source:model`` (see the module docstring)."""
    source, _, model_name = name.partition(":")
    check_positive_int("num_classes", num_classes, where=name)
    if in_channels is not None:
        check_positive_int("in_channels", in_channels, where=name)
    for key in (
        "weights",
        "weights_backbone",
        "pretrained",
        "pretrained_cfg_overlay",
        "checkpoint_path",
    ):
        if key in kwargs:
            raise ModelError(
                f"{name}: {key!r} is not supported; models are built without downloading "
                "weights. Load a checkpoint into the built model instead."
            )
    if source == "torchvision":
        return _torchvision(model_name, num_classes, in_channels or 3, kwargs)
    if source == "timm":
        return _timm(model_name, num_classes, in_channels or 3, kwargs)
    if source in ("hf", "hf-lm"):
        if in_channels is not None:
            raise ModelError(f"{name}: in_channels does not apply to a token model")
        return _hf(model_name, num_classes, kwargs, causal_lm=source == "hf-lm")
    raise ModelError(unknown_name("model source", source, SOURCES))


def _image_kwargs(num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"num_classes": num_classes, "in_channels": in_channels, **kwargs}


def _torchvision(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> External:
    import torchvision

    choices = torchvision.models.list_models()
    if name not in choices:
        raise ModelError(unknown_name("torchvision model", name, choices))
    # Detection/segmentation builders default to downloading ImageNet backbone weights.
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    no_download = {"weights_backbone": None} if "weights_backbone" in params else {}
    try:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **no_download, **kwargs
        )
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot build torchvision:{name} with {kwargs!r}: {e}") from e
    if in_channels != 3:
        _replace_stem(model, in_channels, f"torchvision:{name}")
    side = kwargs.get("image_size", 299 if name == "inception_v3" else 224)
    return External(
        model, (in_channels, side, side), _image_kwargs(num_classes, in_channels, kwargs)
    )


def _replace_stem(model: nn.Module, in_channels: int, where: str) -> None:
    """torchvision models are hard-wired to RGB: swap the first 3-channel conv for a new one.

    The first registered ``Conv2d`` with 3 input channels is taken to be the stem, which holds
    for torchvision's classification models (they define the stem first).
    """
    for name, child in model.named_modules():
        if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
            new = nn.Conv2d(
                in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return
    raise ModelError(f"{where}: found no 3-channel input conv to adapt to {in_channels} channels.")


def _timm(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> External:
    try:
        import timm
    except ImportError as e:
        raise ModelError(
            f"timm:{name} needs the optional package timm: pip install 'eigendamage[models]'."
        ) from e
    if not timm.is_model(name):
        raise ModelError(unknown_name("timm model", name, timm.list_models()))
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot build timm:{name} with {kwargs!r}: {e}") from e
    cfg = getattr(model, "pretrained_cfg", None) or {}
    h, w = (int(s) for s in tuple(cfg.get("input_size", (3, 224, 224)))[-2:])
    img_size = kwargs.get("img_size")  # pretrained_cfg keeps the default size: honour overrides
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return External(model, (in_channels, h, w), _image_kwargs(num_classes, in_channels, kwargs))


# --------------------------------------------------------------------------- transformers


def _hf(name: str, num_classes: int, kwargs: dict[str, Any], *, causal_lm: bool) -> External:
    try:
        import transformers
    except ImportError as e:
        raise ModelError(
            f"hf:{name} needs the optional package transformers: pip install 'eigendamage[models]'."
        ) from e
    overrides = dict(kwargs)
    saved = overrides.pop("config", None)  # a full config dict recorded by an earlier build
    config = _hf_config(name, overrides, saved)
    spec_kwargs: dict[str, Any] = {"num_classes": num_classes, **kwargs}
    if saved is None and Path(name).is_dir():
        spec_kwargs = {"num_classes": num_classes, "config": config.to_dict()}
    try:  # trust_remote_code=False: a config's `auto_map` must never import its .py files
        if causal_lm:
            model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        else:
            config.num_labels = num_classes
            if getattr(config, "pad_token_id", None) is None:
                # Decoder classifiers pool the last non-pad token; without a pad id HF refuses
                # batches larger than 1.  The EOS id is HF's own recommendation.
                config.pad_token_id = getattr(config, "eos_token_id", None)
            model = transformers.AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=False
            )
    except (ValueError, KeyError, TypeError) as e:
        task = "causal LM" if causal_lm else "sequence classifier"
        raise ModelError(f"cannot build hf:{name} as a {task}: {e}") from e
    linearize_conv1d(model)
    seq_len = min(DEFAULT_SEQ_LEN, _max_positions(config))
    extra = {"input_kind": "tokens", "vocab_size": int(config.vocab_size)}
    return External(model, (seq_len,), spec_kwargs, extra)


def _hf_config(name: str, overrides: dict[str, Any], saved: Any) -> Any:
    """The config: a saved dict, a well-known name, a ``model_type`` or a local directory,
    with ``overrides`` applied at construction (configs derive fields in ``__init__``)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if saved is not None:
        if not isinstance(saved, dict) or saved.get("model_type") not in CONFIG_MAPPING:
            raise ModelError(f"hf:{name}: 'config' must be a transformers config dict")
        config_class = CONFIG_MAPPING[saved["model_type"]]
        _check_fields(name, config_class, overrides)
        return config_class.from_dict({**saved, **overrides})
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelError(f"hf:{name}: the directory holds no config.json")
        try:  # never the prompt that runs a directory's own code on "y"
            config = AutoConfig.from_pretrained(
                name, local_files_only=True, trust_remote_code=False
            )
        except (ValueError, KeyError, OSError) as e:
            raise ModelError(f"hf:{name}: cannot read its config.json: {_one_line(e)}") from e
        _check_fields(name, type(config), overrides)
        return type(config).from_dict({**config.to_dict(), **overrides})
    key = next((name[len(o) :] for o in _HF_ORGS if name.startswith(o)), name)
    model_type, defaults = HF_KNOWN.get(key, (key, {}))
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(name, [*HF_KNOWN, *CONFIG_MAPPING.keys()], n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelError(
            f"unknown transformers model {name!r}.{hint} Give one of {', '.join(HF_KNOWN)}, "
            "a transformers model_type (bert, gpt2, ...) or a local directory with a "
            "config.json (nothing is downloaded)."
        )
    _check_fields(name, CONFIG_MAPPING[model_type], overrides)
    return AutoConfig.for_model(model_type, **{**defaults, **overrides})


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _check_fields(name: str, config_class: type, overrides: dict[str, Any]) -> None:
    reference = config_class()
    bad = sorted(k for k in overrides if not hasattr(reference, k))
    if bad:
        raise ModelError(
            f"hf:{name}: unknown config field(s) {', '.join(bad)} for {config_class.__name__}"
        )


def _max_positions(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_SEQ_LEN


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Replace every ``transformers`` ``Conv1D`` in ``model`` (in place) by the equivalent
    ``nn.Linear`` (``weight = Conv1D.weight.T``); returns ``model``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return model
    for name, module in list(model.named_modules()):
        if type(module) is not Conv1D:
            continue
        n_in, n_out = module.weight.shape
        linear = nn.Linear(n_in, n_out, bias=module.bias is not None)
        linear = linear.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model
