"""The ``architecture.json`` document of a model directory: the base model's
``create_model`` spec plus every module that differs from the base, the parameters tied
together and the head counts head pruning changed; and the rebuild of a model from it.

Why not pickle the module tree: a pruned model is a *different architecture* from the one
its constructor builds, and unpickling runs whatever code the file names.  Rebuilding the
base by name and swapping in only registered module types (:mod:`.module_specs`) runs none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import EigenDamageError, ModelError
from ..models import create_model
from .file_checks import check_path, check_slot, check_tie
from .module_specs import _build, _describe, _same_config

__all__ = [
    "ARCHITECTURE_FILE",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "describe_architecture",
]

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FORMAT = "eigendamage-model"
MODEL_FORMAT_VERSION = 1


def _build_base(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the unpruned model from its ``eigendamage_spec``."""
    return create_model(spec["name"], **dict(spec.get("kwargs", {})))


def _build_base_quietly(spec: Mapping[str, Any]) -> nn.Module:
    """Build the base without consuming the caller's torch RNG (weight init draws from it)."""
    with torch.random.fork_rng(devices=[]):
        try:
            return _build_base(spec)
        except EigenDamageError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot build base model {dict(spec)!r}: {exc}") from exc


def _get_spec(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "eigendamage_spec", None)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ModelError(
            "model was not created by eigendamage.models.create_model, so it has no base to "
            "describe it against; save_model saves it relative to a fresh instance of its class"
        )
    # Keep every key (e.g. ``input_size``): the spec is copied verbatim into the file.
    return {**dict(spec), "kwargs": dict(spec.get("kwargs", {}))}


def describe_architecture(model: nn.Module, base: nn.Module | None = None) -> dict[str, Any]:
    """The ``architecture.json`` document: base spec plus every module that differs from it.

    Modules are listed by dotted path, parents first; a described container includes its
    children, so nothing below it is listed again.  ``null`` means "removed from the base".
    """
    spec = _get_spec(model)
    if base is None:
        base = _build_base_quietly(spec)
    base_mods = dict(base.named_modules(remove_duplicate=False))
    pruned_mods = dict(model.named_modules(remove_duplicate=False))
    modules: dict[str, Any] = {}

    def covered(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") or p == "" for p in modules if modules[p])

    for path, module in pruned_mods.items():
        if covered(path):
            continue
        ref = base_mods.get(path)
        if ref is None or not _same_config(ref, module):
            modules[path] = _describe(module, path)
    for path in base_mods:
        if path == "" or path in pruned_mods or covered(path):
            continue
        parent = path.rpartition(".")[0]
        if parent in pruned_mods and not covered(parent):
            modules[path] = None
    doc: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "base": spec,
        "modules": modules,
    }
    tied = _tied_parameters(model)
    if tied:
        doc["tied"] = tied
    attributes = _changed_attributes(model, base)
    if attributes:
        doc["attributes"] = attributes
    return doc


def _changed_attributes(model: nn.Module, base: nn.Module) -> dict[str, dict[str, int]]:
    """Head counts (``HEAD_ATTRIBUTES``) that head pruning changed, by module path: the
    attention's ``forward`` reads them, and they are not part of any weight's shape."""
    from ..structure.heads import HEAD_ATTRIBUTES

    base_mods = dict(base.named_modules())
    changed: dict[str, dict[str, int]] = {}
    for path, module in model.named_modules():
        ref = base_mods.get(path)
        if ref is None or type(ref) is not type(module):
            continue
        diff = {
            a: getattr(module, a)
            for a in HEAD_ATTRIBUTES
            if isinstance(getattr(module, a, None), int) and getattr(module, a) != getattr(ref, a)
        }
        if diff:
            changed[path] = diff
    return changed


def _set_attributes(model: nn.Module, attributes: Mapping[str, Mapping[str, int]]) -> None:
    from ..structure.heads import HEAD_ATTRIBUTES

    for path, values in attributes.items():
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise ModelError(f"architecture.json sets attributes of missing {path!r}") from exc
        for attr, value in values.items():
            # Only head counts the module already has: nothing else may be (re)set from a file.
            current = getattr(module, attr, None)
            if attr not in HEAD_ATTRIBUTES or type(value) is not int or type(current) is not int:
                raise ModelError(f"architecture.json: attribute {path}.{attr}={value!r} refused")
            setattr(module, attr, value)


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{param: first param it is the same object as}``: ties must be re-made on load,
    because rebuilt modules get their own parameters and safetensors stores a tie once."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    for name, source in tied.items():
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
            param = model.get_parameter(source)
        except AttributeError as exc:
            raise ModelError(f"architecture.json ties {name!r} to missing {source!r}") from exc
        check_tie(owner, attr, name)  # a parameter slot, never `forward` & co.
        setattr(owner, attr, param)


def _apply(
    base: nn.Module | None,
    modules: Mapping[str, Any],
    tied: Mapping[str, str] | None = None,
    built: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Swap the described modules into ``base`` (shallow paths first), then re-tie weights.

    ``base`` may be ``None`` when the root itself is described; ``built`` sees each new module.
    """
    root = base

    def build(desc: Mapping[str, Any], path: str) -> nn.Module:
        new = _build(desc, path)
        if built is not None:
            built(new)
        return new

    for path in sorted(modules, key=lambda p: (p.count(".") if p else -1, p)):
        desc = modules[path]
        check_path(path, "module", root=True)
        if path == "":
            if desc is None:
                raise ModelError("architecture.json removes the root module")
            root = build(desc, path)
            continue
        if root is None:
            raise ModelError("architecture.json: no base model to apply the modules to")
        parent_path, _, name = path.rpartition(".")
        try:
            parent = root.get_submodule(parent_path) if parent_path else root
        except AttributeError as exc:
            raise ModelError(f"architecture.json names {path!r}, whose parent is missing") from exc
        check_slot(parent, name, path, remove=desc is None)
        setattr(parent, name, None if desc is None else build(desc, path))
    if root is None:
        raise ModelError("architecture.json: no base model to apply the modules to")
    _retie(root, tied or {})
    return root


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
