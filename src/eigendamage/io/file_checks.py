"""Checks that let :func:`.model_dir.load_model` open a model directory from anyone.

Why: ``architecture.json`` and ``model.safetensors`` may come from a download or a shared run
directory.  Loading them must not run their author's code, recurse without bound, set
arbitrary attributes or allocate memory that the weights do not account for.  So the
description is checked as data first (JSON types, nesting, names, constructor arguments),
then built on the meta device and compared with the weights file's header (names, shapes,
dtypes, bytes); only then is anything built for real.  Every refusal is one ModelError.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ..errors import ModelError

__all__ = [
    "check_args",
    "check_base",
    "check_child_names",
    "check_class_base",
    "check_description",
    "check_document",
    "check_path",
    "check_slot",
    "check_tie",
    "read_architecture",
]

MAX_FILE_BYTES = 16 << 20  # architecture.json of real models is a few hundred KB at most
MAX_JSON_DEPTH = 200  # nesting of JSON containers anywhere in architecture.json
MAX_MODULE_DEPTH = 64  # nesting of containers inside one described module
MAX_MODULES = 50_000  # described, or registered while building on meta (real models: < 5000)
MAX_PATH_CHARS = 1000  # a dotted module path ("transformer.h.11.attn.c_attn")
MAX_LIST_ITEMS = 64  # items of a list-valued constructor argument (kernel sizes, shapes)
REFUSED_ARGS = frozenset({"device", "dtype"})
_ATOM = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[0-9]+")
SHORT_REPR = reprlib.Repr()  # values echoed in messages come from the file: keep them short
SHORT_REPR.maxstring = SHORT_REPR.maxother = 120
_SCALARS = (str, int, float, bool, type(None))
_DOC_KEYS = {"format", "version", "base", "modules", "kept", "tied", "attributes"}
_KEPT_KEYS = {"class", "children"}
_DESC_KEYS = {"type", "args", "children"}

T = TypeVar("T")


# --------------------------------------------------------------------------- architecture.json


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def read_architecture(arch_file: Path, *, model_format: str, version: int) -> dict[str, Any]:
    """Parse and check ``architecture.json``; ModelError for anything :func:`load_model` could
    not rebuild safely.  Returns the document with ``modules``/``tied``/``attributes`` as
    (possibly empty) dicts."""
    try:
        if arch_file.stat().st_size > MAX_FILE_BYTES:
            raise ModelError(f"{arch_file} is larger than {MAX_FILE_BYTES >> 20} MiB")
        text = arch_file.read_text(encoding="utf-8")
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ModelError(f"cannot read {arch_file}: JSON nested too deeply") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise ModelError(f"cannot read {arch_file}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != model_format:
        raise ModelError(f"{arch_file} is not an eigendamage model description")
    if type(doc.get("version")) is not int or doc["version"] != version:
        raise ModelError(
            f"{arch_file} has format version {SHORT_REPR.repr(doc.get('version'))}; this "
            f"eigendamage reads version {version}"
        )
    try:
        return check_document(doc)
    except ModelError as exc:
        raise ModelError(f"{arch_file}: {exc}") from None


def _check_depth(doc: Any) -> None:
    """Iteratively: the rebuild below recurses, so bound the nesting before it starts."""
    stack = [(doc, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ModelError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)


def check_path(path: Any, what: str, *, root: bool = False) -> str:
    """A dotted module/parameter path of plain names: no ``__class__``, ``_private`` or
    empty parts, so it can only reach what ``named_modules``/``named_parameters`` list."""
    if isinstance(path, str) and (
        (root and path == "")
        or (len(path) <= MAX_PATH_CHARS and all(_ATOM.fullmatch(a) for a in path.split(".")))
    ):
        return path
    raise ModelError(
        f"{what} {SHORT_REPR.repr(path)} is not a module path (dotted names of letters, digits "
        "and _, not starting with _)"
    )


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelError(f"{what} must be an object, got {type(value).__name__}")
    return value


def check_document(doc: dict[str, Any]) -> dict[str, Any]:
    """Types and names of every part of the document (the described modules' contents are
    checked again by the rebuild, with the registry at hand)."""
    _check_depth(doc)
    unknown = sorted(set(doc) - _DOC_KEYS)
    if unknown:
        raise ModelError(f"unknown key(s) {SHORT_REPR.repr(unknown)}")
    base = doc.get("base")
    by_class = isinstance(base, dict) and "name" not in base and "class" in base
    base = check_class_base(base) if by_class else check_base(base)
    modules = _mapping(doc.get("modules"), "'modules'")
    kept = _check_kept(_mapping(doc.get("kept"), "'kept'"))
    if kept and not by_class:
        raise ModelError("'kept' modules need a 'base' that names a class")
    count = 0
    for path, desc in modules.items():
        check_path(path, "'modules' entry", root=True)
        if desc is not None and not isinstance(desc, dict):
            raise ModelError(f"module {path!r} must be an object or null")
        count += _count_modules(desc)
        if count > MAX_MODULES:
            raise ModelError(f"describes more than {MAX_MODULES} modules")
    for path in [*modules, *kept]:  # save_model never lists a path inside a described module
        parts = path.split(".") if path else []
        for outer in ("", *(".".join(parts[:i]) for i in range(1, len(parts)))):
            if outer != path and modules.get(outer) is not None:
                raise ModelError(f"module {path!r} lies inside the described module {outer!r}")
    tied = _mapping(doc.get("tied"), "'tied'")
    for name, source in tied.items():
        check_path(name, "tied parameter")
        check_path(source, f"tie source of {name!r}")
    attributes = {
        check_path(path, "'attributes' entry", root=True): _mapping(
            values, f"attributes of {path!r}"
        )
        for path, values in _mapping(doc.get("attributes"), "'attributes'").items()
    }
    for path, values in attributes.items():
        for attr, value in values.items():
            if not _ATOM.fullmatch(attr) or type(value) is not int or value < 0:
                raise ModelError(f"attribute {path}.{attr}={SHORT_REPR.repr(value)} refused")
    return {
        **doc,
        "base": base,
        "modules": modules,
        "kept": kept,
        "tied": tied,
        "attributes": attributes,
    }


def _class_name(value: Any, what: str) -> str:
    """A class name from the file: shown in messages only, never imported."""
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise ModelError(f"{what} {SHORT_REPR.repr(value)} is not a class name")
    return value


def _check_kept(kept: dict[str, Any]) -> dict[str, Any]:
    """``{path: {"class", "children"}}``: the modules a user's fresh instance supplies."""
    count = 0
    for path, entry in kept.items():
        check_path(path, "'kept' entry", root=True)
        if not isinstance(entry, dict) or set(entry) != _KEPT_KEYS:
            raise ModelError(f"'kept' entry {path!r} must be an object with 'class', 'children'")
        _class_name(entry["class"], f"class of kept {path!r}")
        children = entry["children"]
        names_ok = isinstance(children, list) and all(isinstance(c, str) for c in children)
        if not names_ok or len(set(children)) != len(children):
            raise ModelError(f"children of kept {path!r} must be a list of distinct names")
        check_child_names(dict.fromkeys(children), path)
        count += 1 + len(children)
        if count > MAX_MODULES:
            raise ModelError(f"keeps more than {MAX_MODULES} modules")
    return kept


def _count_modules(desc: Any) -> int:
    count, stack = 0, [desc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += 1
            children = node.get("children")
            if isinstance(children, dict):
                stack.extend(children.values())
    return count


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to be a path is not one
        return False


def check_base(spec: Any) -> dict[str, Any]:
    """The base's ``create_model`` spec.  Refused: a saved model directory as base (it would
    load another untrusted file, or itself forever) and an ``hf:`` local directory without
    its recorded config (transformers would read that directory, whose ``config.json`` can
    ask for remote code)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ModelError("'base' must be a create_model spec with a 'name'")
    name = spec["name"]
    kwargs = _mapping(spec.get("kwargs"), "base 'kwargs'")
    for key in kwargs:
        if not _ATOM.fullmatch(key) or key in REFUSED_ARGS:
            raise ModelError(f"base argument {SHORT_REPR.repr(key)} refused")
    source, colon, model_name = name.partition(":")
    if not colon and _exists(Path(name) / "architecture.json"):
        raise ModelError(
            f"base {name!r} is a saved model directory; a saved model must name a registry "
            "model as its base"
        )
    if source in ("hf", "hf-lm") and "config" not in kwargs and _exists(Path(model_name)):
        raise ModelError(
            f"base {name!r} names a local Hugging Face directory; saved models may not "
            "reference local HF directories (their config.json can ask to run code)"
        )
    size = spec.get("input_size")
    if size is not None and (
        not isinstance(size, list)
        or not 1 <= len(size) <= 4
        or any(type(s) is not int or not 1 <= s <= 1 << 16 for s in size)
        or math.prod(size) > 1 << 26
    ):
        raise ModelError(f"base 'input_size' {SHORT_REPR.repr(size)} is not an input shape")
    vocab = spec.get("vocab_size")
    if vocab is not None and (type(vocab) is not int or not 1 <= vocab <= 1 << 24):
        raise ModelError(f"base 'vocab_size' {SHORT_REPR.repr(vocab)} refused")
    return {**spec, "kwargs": kwargs}


def check_class_base(spec: Any) -> dict[str, str]:
    """The base of a model saved without a ``create_model`` spec: its class, recorded for
    messages only (the caller supplies a fresh instance; nothing is imported)."""
    if not isinstance(spec, dict) or set(spec) - {"class", "module"}:
        raise ModelError("'base' must name a create_model spec or a class")
    return {k: _class_name(v, f"base {k!r}") for k, v in spec.items()}


# --------------------------------------------------------------------------- module entries


def check_description(desc: Any, path: str, depth: int) -> tuple[str, dict, dict]:
    """``(type, args, children)`` of one described module, with their JSON types checked."""
    if depth > MAX_MODULE_DEPTH:
        raise ModelError(f"module {path!r} is nested deeper than {MAX_MODULE_DEPTH} containers")
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        raise ModelError(f"architecture entry for {path!r} is malformed: {SHORT_REPR.repr(desc)}")
    unknown = sorted(set(desc) - _DESC_KEYS)
    if unknown:
        raise ModelError(
            f"architecture entry for {path!r} has unknown key(s) {SHORT_REPR.repr(unknown)}"
        )
    args = _mapping(desc.get("args"), f"'args' of {path!r}")
    children = _mapping(desc.get("children"), f"'children' of {path!r}")
    check_child_names(children, path)
    return desc["type"], args, children


def check_child_names(children: Mapping[str, Any], path: str) -> None:
    """Children become attributes of their container: plain names only."""
    for name in children:
        if not _ATOM.fullmatch(name):
            raise ModelError(f"child name {SHORT_REPR.repr(name)} of {path!r} refused")


def check_args(args: Mapping[str, Any], cls: type | None, path: str) -> None:
    """Constructor arguments are plain JSON values; never ``device``/``dtype`` (a meta or
    CUDA module would dodge the checks); with ``cls``, only names its ``__init__`` takes."""
    params: Mapping[str, inspect.Parameter] | None = None
    if cls is not None:
        with contextlib.suppress(TypeError, ValueError):
            params = inspect.signature(cls).parameters
        if params is not None and any(p.kind is p.VAR_KEYWORD for p in params.values()):
            params = None
    for key, value in args.items():
        known = params is None or key in params
        if not _ATOM.fullmatch(key) or key in REFUSED_ARGS or not known:
            raise ModelError(f"argument {SHORT_REPR.repr(key)} of {path!r} refused")
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_LIST_ITEMS or not all(isinstance(v, _SCALARS) for v in items):
            raise ModelError(f"argument {key!r} of {path!r} must be a JSON scalar or short list")


def check_slot(parent: nn.Module, name: str, path: str, *, remove: bool) -> None:
    """Only child-module slots may be replaced or removed (not ``forward``, parameters or
    plain attributes); a new child name must not shadow anything."""
    if name in parent._modules:
        return
    try:
        taken = remove or hasattr(parent, name)
    except Exception:  # a property that fails: something is there
        taken = True
    if taken:
        raise ModelError(f"{path!r} is not a child module of its parent, refused")


def check_tie(owner: nn.Module, attr: str, name: str) -> None:
    """A tie may only re-point an existing parameter (never ``forward`` or ``in_features``)."""
    if owner._parameters.get(attr) is None:
        raise ModelError(f"tied {name!r} is not a parameter of the rebuilt model")
