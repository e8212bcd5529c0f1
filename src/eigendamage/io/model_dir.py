"""Model directories: ``save_model`` writes the weights as safetensors plus
``architecture.json`` (:mod:`.architecture`; :mod:`.user_model` for a model of any class),
``load_model`` rebuilds the base (or takes the caller's fresh instance), swaps the
described modules in and loads the weights strictly; no pickle either way.

Why here and not in ``models``: a saved directory may come from anyone, so loading one goes
through the checks of :mod:`.file_checks` and :mod:`.file_limits`.  The model zoo builds
models by name only; :func:`load_or_create` and :func:`input_shape_of` are for callers that
accept "a model name or a saved directory".
"""

from __future__ import annotations

import errno
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..models import create_model, default_input_shape
from .architecture import (
    ARCHITECTURE_FILE,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    WEIGHTS_FILE,
    _apply,
    _build_base_quietly,
    _get_spec,
    _set_attributes,
    _shapes,
    describe_architecture,
)
from .atomic import _atomic_target, atomic_write_json, new_file_mode
from .file_checks import check_base, check_document, read_architecture
from .file_limits import check_sizes, check_weights, module_bytes, on_meta, read_weights_header
from .user_model import apply_to_instance, check_described, class_of, describe_user_model, meta_copy

__all__ = [
    "build_architecture",
    "input_shape_of",
    "is_model_dir",
    "load_model",
    "load_or_create",
    "save_model",
]


def save_model(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save a (pruned) model as ``path/model.safetensors`` plus ``path/architecture.json``.

    No pickle: the weights are safetensors, the structure is JSON.  A model built by
    :func:`~eigendamage.models.create_model` is saved self-contained (its registry spec plus
    the modules pruning changed).  Any other module (your own class, a torchvision model
    built directly) is saved as the edits to apply onto a fresh instance of its class, which
    :func:`load_model` then needs as ``model=``: the modules of registered types are
    described whole, the others (your own blocks) are taken from the fresh instance.  The
    description is checked before anything is written, so a directory that will not load
    is never produced.

    Args:
        model: the model to save; it is not modified.
        path: the directory to write (created if missing; each file is replaced
            atomically, with the permissions the umask gives any new file).

    Returns:
        The directory, as a ``Path``.

    Raises:
        ModelError: when a changed module's type cannot be described (register it with
            :func:`~eigendamage.io.register_module_type`, or export to ONNX instead).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model as st_save_model

    doc = _registry_doc(model) if _has_spec(model) else describe_user_model(model)
    if not _has_spec(model):
        check_described(model, doc["modules"])
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with _atomic_target(out / WEIGHTS_FILE) as tmp:
        try:
            st_save_model(model, str(tmp), metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O errors are not OSError: a full disk is
            if "os error 28" in str(exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from exc
            raise
        os.chmod(tmp, new_file_mode(out))  # safetensors writes 0600 whatever the umask
    atomic_write_json(out / ARCHITECTURE_FILE, doc, sort_keys=False)
    return out


def _has_spec(model: nn.Module) -> bool:
    return getattr(model, "eigendamage_spec", None) is not None


def _registry_doc(model: nn.Module) -> dict[str, Any]:
    """The description of a registry model, checked by rebuilding it from its base."""
    spec = _get_spec(model)
    check_base(spec)  # what load_model would refuse is never written
    base = _build_base_quietly(spec)
    doc = describe_architecture(model, base)
    with torch.random.fork_rng(devices=[]):  # new modules' init must not move the caller's RNG
        rebuilt = _apply(base, doc["modules"], doc.get("tied"))
    _set_attributes(rebuilt, doc.get("attributes", {}))
    if _shapes(rebuilt) != _shapes(model):
        want, got = _shapes(model), _shapes(rebuilt)
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ModelError(
            "model cannot be described as its base plus replaced modules; mismatched "
            f"state_dict entries: {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}"
        )
    return doc


def load_model(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` and load its weights strictly (on CPU).

    The directory may come from anyone: the description is checked as data, rebuilt on the
    meta device and matched against the weights file's header (names, shapes, bytes) before
    anything is built for real (:mod:`.file_checks`); no code it names is imported.

    Args:
        path: the directory (or either file in it).
        model: a fresh instance of the saved model's class, constructed by you as before
            pruning (e.g. ``torchvision.models.resnet18(num_classes=10)``).  Required for a
            model saved without a ``create_model`` spec; optional for a registry model, whose
            base it then replaces.  It is changed in place into the saved model; one whose
            structure does not fit the directory is refused and left untouched.

    Returns:
        The saved model with its weights: ``model`` itself when given (unless the file
        replaces its root module).

    Raises:
        ModelError: for a missing or refused file, a missing ``model=`` where one is needed,
            or a ``model=`` whose structure does not match the saved one.
    """
    from safetensors import SafetensorError

    p = Path(path)
    if p.is_file() and p.name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
        p = p.parent
    arch_file, weights_file = p / ARCHITECTURE_FILE, p / WEIGHTS_FILE
    for f in (arch_file, weights_file):
        if not f.is_file():
            raise ModelError(f"model file {f} not found; expected a directory from save_model")
    if model is not None and not isinstance(model, nn.Module):
        raise ModelError(f"model= must be an nn.Module, got {type(model).__name__}")
    doc = read_architecture(arch_file, model_format=MODEL_FORMAT, version=MODEL_FORMAT_VERSION)
    spec, by_class = doc["base"], "name" not in doc["base"]
    new_root = doc["modules"].get("") is not None  # then the base is never built for real
    if by_class and model is None and not new_root:
        cls = class_of(doc)
        raise ModelError(
            f"{p} holds a pruned {cls}: load it with load_model({str(p)!r}, "
            f"model=<a fresh instance of {doc['base']['class']}>), built as before pruning"
        )
    header = read_weights_header(weights_file)
    sizes: list[int] = []

    def base_of(meta: bool) -> nn.Module | None:
        if model is not None:
            return meta_copy(model) if meta else model
        return None if by_class else _build_base_quietly(spec)

    def rebuild(
        base: nn.Module | None, built: Callable[[nn.Module], object] | None = None
    ) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # new modules' init must not move the RNG
            try:
                if by_class:
                    return apply_to_instance(base, doc, built)
                rebuilt = _apply(base, doc["modules"], doc["tied"], built)
                _set_attributes(rebuilt, doc["attributes"])
            except ModelError as exc:
                raise ModelError(f"{arch_file}: {exc}") from exc
        return rebuilt

    def rebuild_on_meta() -> nn.Module:
        sizes.clear()
        base = base_of(meta=True)
        sizes.append(0 if base is None or model is not None else module_bytes(base))
        return rebuild(base, lambda m: sizes.append(module_bytes(m)))

    meta = on_meta(rebuild_on_meta)
    try:
        check_weights(meta, header, weights_file)
    except ModelError as exc:
        if model is None:
            raise
        raise ModelError(f"{exc}; is model= built with the arguments of the saved model?") from exc
    try:
        # The base is bounded even when replaced: the model's spec names it, and `bench
        # latency` or `compare` rebuild it from there.  A caller's model= is theirs.
        check_sizes(
            weights_file,
            sizes[0],
            sum(sizes[1:]),
            meta,
            class_of(doc) if by_class else spec["name"],
        )
    except ModelError as exc:
        raise ModelError(f"{arch_file}: {exc}") from exc
    del meta
    loaded = rebuild(None if new_root else base_of(meta=False))
    try:
        _load_weights(loaded, weights_file)
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise ModelError(f"cannot load weights {weights_file}: {exc}") from exc
    if not by_class and getattr(loaded, "eigendamage_spec", None) is None:  # root replaced
        loaded.eigendamage_spec = {**spec, "kwargs": dict(spec.get("kwargs", {}))}
    return loaded


def build_architecture(doc: Mapping[str, Any], *, max_growth: float = 4.0) -> nn.Module:
    """The model an ``architecture.json`` document describes, with freshly initialised
    weights: what latency depends on, without the weights file (benchmarks re-time pruned
    models from their recorded structure).

    The document is checked as :func:`load_model` checks one, and rebuilt on the meta
    device first: described modules may take at most ``max_growth`` times the base's bytes
    (plus 64 MiB), since there is no weights file to bound them by.
    """
    doc = check_document(
        json.loads(json.dumps(doc, allow_nan=False))  # a copy, as plain JSON data
    )
    spec = doc["base"]
    if "name" not in spec:
        raise ModelError(
            f"the architecture describes a pruned {class_of(doc)}: rebuild it with "
            "load_model(dir, model=<a fresh instance>)"
        )
    sizes: list[int] = []

    def rebuild(base: nn.Module | None, built=None) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            model = _apply(base, doc["modules"], doc["tied"], built)
            _set_attributes(model, doc["attributes"])
        return model

    def rebuild_on_meta() -> nn.Module:
        base = _build_base_quietly(spec)
        sizes.append(module_bytes(base))
        return rebuild(base, lambda m: sizes.append(module_bytes(m)))

    on_meta(rebuild_on_meta)
    if sum(sizes[1:]) > max_growth * sizes[0] + (64 << 20):
        raise ModelError(
            f"architecture of {spec['name']!r} describes {sum(sizes[1:]):,} bytes of modules, "
            f"more than {max_growth:g}x its base ({sizes[0]:,} bytes)"
        )
    new_root = doc["modules"].get("") is not None
    model = rebuild(None if new_root else _build_base_quietly(spec))
    if getattr(model, "eigendamage_spec", None) is None:
        model.eigendamage_spec = {**spec, "kwargs": dict(spec.get("kwargs", {}))}
    return model


def _load_weights(model: nn.Module, weights_file: Path) -> None:
    """Load a safetensors file strictly, with the model's own state_dict metadata.

    Why not ``safetensors.torch.load_model``: it drops the per-module ``version`` metadata
    that some modules' ``_load_from_state_dict`` require (torchvision's MNASNet refuses to
    load without it).  The file stores a tied tensor once; the names missing from it must
    be exactly the aliases of names it holds.
    """
    from safetensors.torch import load_file

    own = model.state_dict()
    state = OrderedDict(load_file(str(weights_file)))
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    result = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise RuntimeError(
            f"missing keys {untied[:5]}, unexpected keys {result.unexpected_keys[:5]}"
        )


def is_model_dir(name: str) -> bool:
    """True for a directory written by ``save_model`` (it holds ``architecture.json``)."""
    path = Path(name)
    return path.is_dir() and (path / ARCHITECTURE_FILE).is_file()


def load_or_create(
    name: str, *, num_classes: int = 10, in_channels: int | None = None, **kwargs: Any
) -> nn.Module:
    """A model by registry name or ``source:name`` (:func:`~eigendamage.models.create_model`),
    or the (pruned) model a directory written by :func:`save_model` holds.

    Args:
        name: a model name or a saved model directory.
        num_classes: classes of a model built by name (a saved model fixes its own).
        in_channels: input channels of a model built by name; None means its default.
        **kwargs: the named model's extra arguments and ``seed``; a saved model takes none.

    Returns:
        The model, built on CPU.

    Raises:
        ModelError: for an unknown name, bad arguments or a directory that does not load.
    """
    if isinstance(name, str) and name and is_model_dir(name):
        if kwargs:
            raise ModelError(f"{name} is a saved model: it takes no extra arguments")
        return load_model(name)
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def input_shape_of(name_or_model: str | nn.Module, *, batch_size: int = 1) -> tuple[int, ...]:
    """The (N, C, H, W) a model, a model name or a saved model directory is meant for.

    Args:
        name_or_model: a model made by ``create_model``, a model name or a saved directory
            (its ``architecture.json`` is read through the checks: it may come from anyone).
        batch_size: N.

    Returns:
        The input shape, batch first.

    Raises:
        ModelError: for an unknown name or a directory whose description is refused.
    """
    if isinstance(name_or_model, nn.Module) or not is_model_dir(name_or_model):
        return default_input_shape(name_or_model, batch_size=batch_size)
    doc = read_architecture(
        Path(name_or_model) / ARCHITECTURE_FILE,
        model_format=MODEL_FORMAT,
        version=MODEL_FORMAT_VERSION,
    )
    if "input_size" not in doc["base"]:
        raise ModelError(f"{name_or_model}: its architecture.json records no input size")
    return (batch_size, *doc["base"]["input_size"])
