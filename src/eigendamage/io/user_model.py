"""Models that ``create_model`` did not build (a user's ``nn.Module`` class, a torchvision
model built directly): saved as the edits to apply onto a fresh instance of their class,
which the caller supplies on load (``load_model(dir, model=...)``).

Why a fresh instance and not a spec: eigendamage cannot rebuild a user's class without
importing, i.e. running, code that a file names.  So the file records the class name for
messages only.  Every module that can be described (a registered type, :mod:`.module_specs`)
is described whole; every other one (the user's own blocks) is *kept* from the fresh
instance, with its class name and child names, so that an instance of another class, or
one built with other arguments, is refused instead of loaded wrongly.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .architecture import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    _apply,
    _set_attributes,
    _shapes,
    _tied_parameters,
)
from .file_checks import SHORT_REPR
from .file_limits import on_meta
from .module_specs import _build, _describable, _describe

__all__ = ["apply_to_instance", "class_of", "describe_user_model", "meta_copy"]


def describe_user_model(model: nn.Module) -> dict[str, Any]:
    """The ``architecture.json`` document of a model without a ``create_model`` spec.

    ``modules`` describes each describable module whole (``null``: a child set to None);
    ``kept`` lists the others by path with their class and child names (the fresh instance
    supplies them); ``attributes`` holds the head counts of kept modules.
    """
    from ..structure.heads import HEAD_ATTRIBUTES

    modules: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    attributes: dict[str, dict[str, int]] = {}

    def walk(path: str, module: nn.Module) -> None:
        if _describable(module):
            modules[path] = _describe(module, path)
            return
        kept[path] = {"class": type(module).__name__, "children": list(module._modules)}
        heads = {
            a: getattr(module, a) for a in HEAD_ATTRIBUTES if type(getattr(module, a, None)) is int
        }
        if heads:
            attributes[path] = heads
        for name, child in module._modules.items():
            child_path = f"{path}.{name}" if path else name
            if child is None:
                modules[child_path] = None
            else:
                walk(child_path, child)

    walk("", model)
    cls = type(model)
    doc: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "base": {"class": cls.__qualname__, "module": cls.__module__},
        "modules": modules,
        "kept": kept,
    }
    tied = _tied_parameters(model)
    if tied:
        doc["tied"] = tied
    if attributes:
        doc["attributes"] = attributes
    return doc


def check_described(model: nn.Module, modules: Mapping[str, Any]) -> None:
    """Each described module, rebuilt on the meta device, has the state_dict shapes of the
    module it describes: a file that will not load is never written."""
    for path, desc in modules.items():
        if desc is None:
            continue
        with torch.random.fork_rng(devices=[]):
            rebuilt = on_meta(lambda desc=desc, path=path: _build(desc, path))
        if _shapes(rebuilt) != _shapes(model.get_submodule(path)):
            raise ModelError(
                f"module {path or '<root>'!r} ({type(rebuilt).__name__}) cannot be rebuilt "
                "from its description: its state_dict shapes differ"
            )


def class_of(doc: Mapping[str, Any]) -> str:
    """The saved model's class as the file names it (for messages), e.g.
    ``torchvision.models.resnet.ResNet``."""
    base = doc["base"]
    return ".".join(str(base[k]) for k in ("module", "class") if k in base)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory):
    the structure to check a file against before the caller's instance is changed."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise ModelError(f"cannot copy model= ({type(model).__name__}) to check it: {exc}") from exc


def apply_to_instance(
    base: nn.Module | None,
    doc: Mapping[str, Any],
    built: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Turn ``base`` (a fresh instance of the saved class, or a meta copy of one) into the
    saved model, in place: check the kept modules, replace the described modules that differ
    from the fresh ones, restore child order, ties and head counts.

    Raises:
        ModelError: when ``base`` does not have the saved model's structure.
    """
    modules, kept = doc["modules"], doc["kept"]
    if base is None and modules.get("") is None:
        raise ModelError("no base model to apply the modules to")
    if base is not None:
        _check_kept(base, doc)
    changed = {p: d for p, d in modules.items() if base is None or not _same(base, p, d)}
    root = _apply(base, changed, doc["tied"], built)
    for path, entry in kept.items():
        module = root.get_submodule(path)
        if list(module._modules) != entry["children"]:
            if set(module._modules) != set(entry["children"]):
                raise _mismatch(doc, f"{path or 'the root'} has children {list(module._modules)}")
            order = {name: module._modules[name] for name in entry["children"]}
            module._modules.clear()
            module._modules.update(order)
    _set_attributes(root, doc["attributes"])
    return root


def _mismatch(doc: Mapping[str, Any], detail: str) -> ModelError:
    cls = class_of(doc)
    return ModelError(
        f"model= does not match the saved {cls}: {detail}; pass a fresh instance of {cls} "
        "built with the arguments of the saved one"
    )


def _check_kept(base: nn.Module, doc: Mapping[str, Any]) -> None:
    """Every kept module exists with its class, and has the saved children (a missing one
    only where the file describes it: pruning added it)."""
    modules = doc["modules"]
    for path, entry in doc["kept"].items():
        try:
            module = base.get_submodule(path)
        except AttributeError:
            raise _mismatch(doc, f"it has no module {path!r} ({entry['class']})") from None
        got, want = type(module).__name__, entry["class"]
        if got != want:
            where = repr(path) if path else "the root"
            raise _mismatch(doc, f"{where} is a {got!r}, the saved one a {SHORT_REPR.repr(want)}")
        prefix = f"{path}." if path else ""
        names, saved = set(module._modules), entry["children"]
        added = {n for n in saved if modules.get(prefix + n) is not None}
        if names - set(saved) or set(saved) - names - added:
            where = repr(path) if path else "the root"
            raise _mismatch(
                doc, f"{where} ({got}) has children {sorted(names)}, the saved one {saved}"
            )


def _same(base: nn.Module, path: str, desc: Any) -> bool:
    """True when ``base`` already holds the described module at ``path`` (kept as it is:
    hooks and shared modules of the fresh instance survive)."""
    if desc is None:
        return False
    try:
        module = base.get_submodule(path)
        return json.loads(json.dumps(_describe(module, path))) == desc
    except (AttributeError, ModelError, TypeError, ValueError):
        return False
