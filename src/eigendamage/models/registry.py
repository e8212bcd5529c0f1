"""Name -> model builder registry (timm-style), plus ``torchvision:``/``timm:``/``hf:``/
``hf-lm:`` sources (:mod:`.external`).  Saved model directories are loaded by
:func:`eigendamage.io.load_or_create`: reading a file from anyone is io's job, not the zoo's.

Every model made by :func:`create_model` carries ``model.eigendamage_spec`` = ``{"name",
"kwargs", "input_size"}`` so that a checkpoint of a pruned model can be rebuilt from its
registry name before the pruned shapes are applied (:func:`create_from_spec`).  Token models
(``hf:``) add ``"input_kind": "tokens"`` and ``"vocab_size"``; their ``input_size`` is
``[sequence length]`` (see :func:`example_input`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import ModelError, unknown_name

SPEC_ATTR = "eigendamage_spec"
_FIXED = ("num_classes", "in_channels")

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]  # default (C, H, W); C is the default in_channels


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, *, input_size: tuple[int, int, int] = (3, 32, 32)
) -> Callable[[F], F]:
    """Register ``builder(num_classes, in_channels, **kwargs) -> nn.Module`` under ``name``.

    ``input_size`` is the (C, H, W) the model is meant for; it sets the default
    ``in_channels`` and the shape used for FLOP counting when none is given.
    """
    if ":" in name:
        raise ValueError(f"model name {name!r} must not contain ':' (reserved for sources)")

    def decorator(builder: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        params = inspect.signature(builder).parameters
        missing = [p for p in _FIXED if p not in params]
        if missing:
            raise ValueError(f"builder for {name!r} must accept {', '.join(missing)}")
        _REGISTRY[name] = _Entry(builder, tuple(input_size))
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered names, sorted (torchvision/timm models are reached with a prefix)."""
    return sorted(_REGISTRY)


def _jsonable(value: Any) -> Any:
    """Tuples -> lists (recursively), so a spec survives a JSON round trip unchanged."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _tag(
    model: nn.Module,
    name: str,
    kwargs: dict[str, Any],
    input_size: tuple[int, ...],
    extra: dict[str, Any] | None = None,
) -> None:
    spec = {"name": name, "kwargs": _jsonable(kwargs), "input_size": list(input_size)}
    setattr(model, SPEC_ATTR, {**spec, **(extra or {})})


@contextmanager
def _seeded_init(seed: int | None) -> Iterator[None]:
    """Draw initial weights from ``seed`` inside the block without moving the caller's RNG.

    Only torch's CPU generator is forked and seeded: models are built on CPU.  ``None``
    draws from the global RNG as usual.
    """
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64
    ):
        raise ModelError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}.")
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int | None = None,
    seed: int | None = 0,
    **kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised model by registry name or ``source:name``.

    Sources: ``torchvision:``, ``timm:``, ``hf:`` (sequence classifier), ``hf-lm:`` (causal
    LM); see :mod:`.external`.  Pretrained weights are never downloaded.

    Args:
        name: a registered name (:func:`list_models`) or ``source:name``.
        num_classes: outputs of the classifier.
        in_channels: input channels; None means the model's own default (1 for digits
            nets, 3 otherwise).
        seed: the initial weights' seed, so the same call builds the same model; the
            caller's global RNG is left where it was.  None draws from the global RNG.
        **kwargs: the model's own extra arguments (``widths=...``, config fields).

    Returns:
        The model on CPU, with ``model.eigendamage_spec`` (the seed is not part of it).

    Raises:
        ModelError: for unknown names, arguments or seeds, with the valid choices.
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {name!r}.")
    with _seeded_init(seed):
        return _build(name, num_classes, in_channels, kwargs)


def _build(
    name: str, num_classes: int, in_channels: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    if ":" in name:
        from .external import create_external

        ext = create_external(name, num_classes, in_channels, kwargs)
        _tag(ext.model, name, ext.spec_kwargs, ext.input_size, ext.spec_extra)
        return ext.model
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ModelError(
            unknown_name("model", name, list_models())
            + " Other models: 'torchvision:<name>', 'timm:<name>', 'hf:<name>', "
            "'hf-lm:<name>' or a directory written by save_model."
        )
    if in_channels is None:
        in_channels = entry.input_size[0]
    params = inspect.signature(entry.builder).parameters
    allowed = [p for p in params if p not in _FIXED and params[p].kind is not params[p].VAR_KEYWORD]
    bad = sorted(k for k in kwargs if k not in allowed)
    if bad:
        raise ModelError(
            f"model {name!r} got unexpected argument(s) {', '.join(bad)}; "
            f"it accepts: {', '.join(allowed) or 'no extra arguments'}."
        )
    try:
        model = entry.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except (TypeError, ValueError) as e:  # e.g. widths=5: a bad value, reported as such
        raise ModelError(f"cannot build model {name!r} with {kwargs!r}: {e}") from e
    input_size = (in_channels, *entry.input_size[1:])
    if isinstance(kwargs.get("image_size"), int):  # builders that take it size their input
        input_size = (in_channels, kwargs["image_size"], kwargs["image_size"])
    _tag(
        model, name, {"num_classes": num_classes, "in_channels": in_channels, **kwargs}, input_size
    )
    return model


def create_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a fresh (unpruned) model from a ``model.eigendamage_spec`` dict."""
    try:
        name, kwargs = spec["name"], dict(spec["kwargs"])
    except (KeyError, TypeError) as e:
        raise ModelError(f"bad model spec {spec!r}: needs 'name' and 'kwargs'.") from e
    return create_model(name, **kwargs)


def default_input_shape(name_or_model: str | nn.Module, *, batch_size: int = 1) -> tuple[int, ...]:
    """The (N, C, H, W) a model is meant for: from its spec, or the registry for a name
    (a saved model directory: :func:`eigendamage.io.input_shape_of`).

    For counting FLOPs without making the caller know each model's input resolution.
    """
    if isinstance(name_or_model, nn.Module):
        spec = getattr(name_or_model, SPEC_ATTR, None)
        if not isinstance(spec, dict) or "input_size" not in spec:
            raise ModelError(
                f"{type(name_or_model).__name__} was not made by create_model, so its input "
                "shape is unknown; pass input_shape explicitly."
            )
        size = tuple(spec["input_size"])
    elif ":" in name_or_model:  # the source decides (inception_v3: 299, timm configs, hf)
        size = tuple(create_model(name_or_model).eigendamage_spec["input_size"])
    elif name_or_model in _REGISTRY:
        size = _REGISTRY[name_or_model].input_size
    else:
        raise ModelError(unknown_name("model", name_or_model, list_models()))
    return (batch_size, *size)


def example_input(model: nn.Module, batch_size: int = 1, *, seed: int = 0) -> torch.Tensor:
    """A random input the model accepts, from its spec: token ids for ``hf:`` models (a
    float image tensor would fail in the embedding), images otherwise.  For export, latency
    and FLOP counting of any model made by :func:`create_model`."""
    spec = getattr(model, SPEC_ATTR, None)
    if not isinstance(spec, dict) or "input_size" not in spec:
        raise ModelError(
            f"{type(model).__name__} was not made by create_model, so its input is unknown; "
            "pass an input shape explicitly."
        )
    shape = (batch_size, *spec["input_size"])
    gen = torch.Generator().manual_seed(seed)
    if spec.get("input_kind") == "tokens":
        return torch.randint(0, int(spec["vocab_size"]), shape, generator=gen)
    ref = next(model.parameters(), None)
    dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    return torch.randn(shape, generator=gen, dtype=dtype)
