"""Files: atomic writes, output directories, training checkpoints and pickle-free model files.

Why atomic: a run killed mid-write (Ctrl-C, OOM, preemption) must never leave a truncated
result or checkpoint that a later ``--resume`` trusts.  Every writer here goes through a temp
file in the target directory, ``fsync`` and ``os.replace``.

Why pickle-free model files: a pruned model is a *different architecture* from the one its
constructor builds (thinner convs, K-FAC eigenbasis bottlenecks).  Instead of pickling the
module tree, ``save_model`` writes the weights as safetensors plus ``architecture.json``: the
base model's ``create_model`` spec and a description of every module that differs from it.
``load_model`` rebuilds the base, swaps those modules in and loads the weights strictly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pickle
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

try:  # POSIX only: output-directory locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
from torch import nn

from . import model_file_checks as checks
from . import model_file_limits as limits
from .errors import (
    CheckpointError,
    EigenDamageError,
    ModelError,
    OutputExistsError,
    OutputInUseError,
)

__all__ = [
    "ARCHITECTURE_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "ModuleType",
    "OutputInUseError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "describe_architecture",
    "load_checkpoint",
    "load_model",
    "load_model_file",
    "lock_output_dir",
    "prepare_output_dir",
    "register_module_type",
    "remove_stale_temp_files",
    "save_checkpoint",
    "save_model",
    "to_json",
]

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FORMAT = "eigendamage-model"
MODEL_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- atomic writes

_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and ``os.replace`` it over
    ``path``, on failure delete it.  Same directory => same filesystem => atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        # Writers may have closed the file already; reopen to fsync the data to disk
        # (read-write: Windows refuses to flush a read-only descriptor).
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno and not exc.filename:  # a write to an fd: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every OS/filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one."""
    with _atomic_target(path) as tmp:
        # O_EXCL: never clobber a stranger's file; 0o666 so the umask decides permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomic text write (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    """Make the values our results actually contain JSON-serializable."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def to_json(obj: Any, *, sort_keys: bool = True) -> str:
    """Canonical JSON text (sorted keys, indent 2, trailing newline) used for all outputs."""
    return json.dumps(obj, sort_keys=sort_keys, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True) -> Path:
    """Atomic JSON write; numpy/torch scalars, paths and dataclasses are converted.

    ``sort_keys=False`` is for documents whose key order means something (the children of an
    ``nn.Sequential`` in ``architecture.json`` run in that order).
    """
    return atomic_write_text(path, to_json(obj, sort_keys=sort_keys))


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` through a temp file, so a crash never leaves a truncated checkpoint.

    Serialized in memory first: torch's zip writer reports a full disk as an opaque
    ``RuntimeError`` ("unexpected pos ..."), a plain write as ``OSError(ENOSPC)``."""
    buffer = BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- output dirs


def check_output_dir(path: str | os.PathLike[str], *, force: bool, resume: bool = False) -> Path:
    """Everything :func:`prepare_output_dir` checks, without creating anything.

    Jobs call this before their (slow, fallible) setup and create the directory only once
    the inputs are known to be good, so a failing run leaves nothing behind.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"output path {p} exists and is not a directory")
    if p.is_dir():
        # A run killed while writing its first file leaves only a temp file: still empty.
        if any(not _TEMP_NAME.fullmatch(c.name) for c in p.iterdir()) and not (force or resume):
            raise OutputExistsError(
                f"output directory {p} exists; pass --force to overwrite or --resume {p} to "
                "continue"
            )
        return p
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputExistsError(f"cannot create output directory {p}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputExistsError(
            f"cannot create output directory {p}: no write permission in {ancestor}"
        )
    return p


@contextlib.contextmanager
def lock_output_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive OS lock on the existing directory ``path`` while the block runs.

    Why: two runs writing into one directory mix their results and delete each other's
    files; the second one is refused at once instead.  The lock is ``flock`` on the
    directory's own descriptor: it leaves no lock file behind, and the OS releases it when
    the descriptor closes, whatever ends the process (SIGKILL included).  Where ``flock``
    is missing (Windows) or the filesystem refuses it, the run goes ahead unlocked.
    """
    p = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        yield p
        return
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUseError(
                f"output directory {p} is in use: another eigendamage run holds it; wait for "
                "it to finish or choose another --out"
            ) from None
        except OSError:  # pragma: no cover - a filesystem without flock (some network mounts)
            pass
        yield p
    finally:
        os.close(fd)


def prepare_output_dir(path: str | os.PathLike[str], *, force: bool, resume: bool = False) -> Path:
    """Create ``path`` or accept it; refuse a non-empty one unless forced or resuming.

    ``force`` deletes nothing here: callers that know which files belong to a run remove
    those (see ``runner``); anything else in the directory is left alone.
    """
    p = check_output_dir(path, force=force, resume=resume)
    p.mkdir(parents=True, exist_ok=True)
    return p


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that writes killed mid-way (SIGKILL, power loss) left behind.

    Only names of the form :func:`_atomic_target` produces are touched.
    """
    removed = []
    for tmp in Path(directory).rglob(".*.tmp"):
        if tmp.is_file() and _TEMP_NAME.fullmatch(tmp.name):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_safe(obj: Any, where: str) -> Any:
    """Convert numpy values to torch/python ones and reject anything that
    ``torch.load(weights_only=True)`` would refuse, naming the offending key."""
    if isinstance(obj, torch.Tensor | str | bool | int | float | type(None)):
        return obj
    if isinstance(obj, torch.dtype | torch.Size | torch.device):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        items = ((k, _checkpoint_safe(v, f"{where}.{k}")) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list | tuple):
        out = [_checkpoint_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    raise TypeError(
        f"checkpoint value at {where} has type {type(obj).__name__}, which cannot be loaded "
        "with weights_only=True; store tensors, numbers, strings, lists or dicts instead"
    )


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically save a checkpoint dict that :func:`load_checkpoint` can load safely."""
    return atomic_torch_save(path, _checkpoint_safe(dict(state), "state"))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {p} is corrupt or holds objects that cannot be loaded safely "
            f"(weights_only=True): {first}"
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors from a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {p} is corrupt or truncated: {first}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(state).__name__}, not an eigendamage checkpoint dict"
        )
    return state


# --------------------------------------------------------------------------- module registry


@dataclasses.dataclass(frozen=True)
class ModuleType:
    """How to describe a module type as JSON and rebuild it.

    ``describe(module)`` returns the JSON-able constructor arguments; ``build(args, children)``
    returns a new module (``children`` is the rebuilt children, empty for leaf types).  With
    ``container=True`` the children are described recursively and passed to ``build``.
    ``init_args=True`` says ``build`` passes ``args`` to ``cls(**args)``: :func:`load_model`
    then refuses argument names that ``cls.__init__`` does not take.
    """

    name: str
    describe: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any], dict[str, nn.Module]], nn.Module]
    cls: type | None = None
    container: bool = False
    init_args: bool = False


_REGISTRY: dict[str, ModuleType] = {}


def register_module_type(
    name: str,
    describe: Callable[[nn.Module], dict[str, Any]],
    build: Callable[[dict[str, Any], dict[str, nn.Module]], nn.Module],
    *,
    cls: type | None = None,
    container: bool = False,
    init_args: bool = False,
) -> None:
    """Teach :func:`save_model`/:func:`load_model` a module type.

    ``cls`` is matched exactly (a subclass is a different type); without it, any class whose
    ``__name__`` equals ``name`` matches.  Registering a name again replaces the entry.
    """
    _REGISTRY[name] = ModuleType(name, describe, build, cls, container, init_args)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _args(module: nn.Module, *names: str) -> dict[str, Any]:
    return {n: _jsonable(getattr(module, n)) for n in names}


def _conv_args(m: nn.Module) -> dict[str, Any]:
    a = _args(
        m,
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )
    a["bias"] = m.bias is not None
    return a


def _linear_args(m: nn.Module) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


def _bn_args(m: nn.Module) -> dict[str, Any]:
    a = _args(m, "num_features", "eps", "momentum", "affine", "track_running_stats")
    if m.affine and m.bias is None:  # `bias=False` exists only in recent torch; omit otherwise
        a["bias"] = False
    return a


def _layernorm_args(m: nn.Module) -> dict[str, Any]:
    a = _args(m, "normalized_shape", "eps", "elementwise_affine")
    a["bias"] = getattr(m, "bias", None) is not None
    return a


def _simple(cls: type, describe: Callable[[nn.Module], dict[str, Any]]) -> None:
    register_module_type(
        cls.__name__, describe, lambda args, children, _c=cls: _c(**args), cls=cls, init_args=True
    )


def _register_builtins() -> None:
    _simple(nn.Conv1d, _conv_args)
    _simple(nn.Conv2d, _conv_args)
    _simple(nn.Linear, _linear_args)
    _simple(nn.BatchNorm1d, _bn_args)
    _simple(nn.BatchNorm2d, _bn_args)
    _simple(nn.LayerNorm, _layernorm_args)
    _simple(nn.Identity, lambda m: {})
    _simple(nn.Flatten, lambda m: _args(m, "start_dim", "end_dim"))
    for act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish):
        _simple(act, lambda m: _args(m, "inplace"))
    for act in (nn.Sigmoid, nn.Tanh):
        _simple(act, lambda m: {})
    _simple(nn.GELU, lambda m: _args(m, "approximate"))
    _simple(nn.Dropout, lambda m: _args(m, "p", "inplace"))
    _simple(
        nn.MaxPool2d,
        lambda m: _args(
            m, "kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"
        ),
    )
    _simple(
        nn.AvgPool2d,
        lambda m: _args(
            m,
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
            "divisor_override",
        ),
    )
    _simple(nn.AdaptiveAvgPool2d, lambda m: _args(m, "output_size"))
    register_module_type(
        "Sequential",
        lambda m: {},
        lambda args, children: nn.Sequential(OrderedDict(children)),
        cls=nn.Sequential,
        container=True,
    )


_register_builtins()


def _register_kfe_bottleneck() -> None:
    """Register ``KFEBottleneck`` lazily: io must not import surgery code (or fail) eagerly."""
    if "KFEBottleneck" in _REGISTRY:
        return
    try:
        from .surgery.eigenbasis import KFEBottleneck
    except ImportError:
        return
    register_module_type(
        "KFEBottleneck",
        lambda m: {},
        lambda args, ch: KFEBottleneck(ch["rot_in"], ch["core"], ch["rot_out"]),
        cls=KFEBottleneck,
        container=True,
    )


def _lookup(module: nn.Module) -> ModuleType | None:
    _register_kfe_bottleneck()
    t = type(module)
    by_name = None
    for entry in _REGISTRY.values():
        if entry.cls is t:
            return entry
        if entry.cls is None and entry.name == t.__name__:
            by_name = entry
    return by_name


def _describe(module: nn.Module, path: str) -> dict[str, Any]:
    entry = _lookup(module)
    if entry is None:
        raise ModelError(
            f"cannot save module {path or '<root>'!r} of type {type(module).__name__}: "
            "its architecture cannot be described; register it with "
            "eigendamage.io.register_module_type or use `eigendamage export`"
        )
    desc: dict[str, Any] = {"type": entry.name}
    args = entry.describe(module)
    if entry.container:
        if args:
            desc["args"] = args
        desc["children"] = {
            name: _describe(child, f"{path}.{name}" if path else name)
            for name, child in module.named_children()
        }
    else:
        desc["args"] = args
    return desc


def _build(desc: Mapping[str, Any], path: str, depth: int = 1) -> nn.Module:
    """Rebuild one described module; its JSON is checked first (it may come from anyone)."""
    type_name, args, child_descs = checks.check_description(desc, path, depth)
    _register_kfe_bottleneck()
    entry = _REGISTRY.get(type_name)
    if entry is None:
        raise ModelError(f"architecture entry for {path!r} has unknown module type {type_name!r}")
    checks.check_args(args, entry.cls if entry.init_args else None, path)
    children = {
        name: _build(child, f"{path}.{name}" if path else name, depth + 1)
        for name, child in child_descs.items()
    }
    try:
        return entry.build(dict(args), children)
    except Exception as exc:
        raise ModelError(f"cannot rebuild {type_name} at {path!r}: {exc}") from exc


def _same_config(a: nn.Module, b: nn.Module) -> bool:
    """True when ``b`` is constructed like ``a`` (children are compared separately)."""
    if type(a) is not type(b):
        return False
    names_a = [n for n, _ in a.named_children()]
    names_b = [n for n, _ in b.named_children()]
    entry = _lookup(a)
    if entry is None:
        # An opaque user block (e.g. ResNet BasicBlock): its constructor is unknown, but its
        # children are checked one by one; new or deleted children are recorded per path.
        return True
    if entry.container and names_a != names_b:
        return False
    return entry.describe(a) == entry.describe(b)


# --------------------------------------------------------------------------- model files


def _build_base(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the unpruned model from its ``eigendamage_spec`` (models imported lazily)."""
    from .models import create_model

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
            "model was not created by eigendamage.models.create_model; use `eigendamage export` "
            "(ONNX / TorchScript) to save arbitrary models"
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
    from .structure.heads import HEAD_ATTRIBUTES

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
    from .structure.heads import HEAD_ATTRIBUTES

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
        checks.check_tie(owner, attr, name)  # a parameter slot, never `forward` & co.
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
        checks.check_path(path, "module", root=True)
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
        checks.check_slot(parent, name, path, remove=desc is None)
        setattr(parent, name, None if desc is None else build(desc, path))
    if root is None:
        raise ModelError("architecture.json: no base model to apply the modules to")
    _retie(root, tied or {})
    return root


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``path/model.safetensors`` and ``path/architecture.json`` (no pickle).

    The description is checked before anything is written: rebuilding it must reproduce the
    model's state_dict keys and shapes, so a file that will not load is never produced.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model as st_save_model

    spec = _get_spec(model)
    checks.check_base(spec)  # what load_model would refuse is never written
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
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with _atomic_target(out / WEIGHTS_FILE) as tmp:
        try:
            st_save_model(model, str(tmp), metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O errors are not OSError: a full disk is
            if "os error 28" in str(exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from exc
            raise
    atomic_write_json(out / ARCHITECTURE_FILE, doc, sort_keys=False)
    return out


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` and load its weights strictly (on CPU).

    The directory may come from anyone: the description is checked as data, rebuilt on the
    meta device and matched against the weights file's header (names, shapes, bytes) before
    anything is built for real (:mod:`.model_file_checks`).
    """
    from safetensors import SafetensorError

    p = Path(path)
    if p.is_file() and p.name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
        p = p.parent
    arch_file, weights_file = p / ARCHITECTURE_FILE, p / WEIGHTS_FILE
    for f in (arch_file, weights_file):
        if not f.is_file():
            raise ModelError(f"model file {f} not found; expected a directory from save_model")
    doc = checks.read_architecture(
        arch_file, model_format=MODEL_FORMAT, version=MODEL_FORMAT_VERSION
    )
    spec = doc["base"]
    header = limits.read_weights_header(weights_file)
    new_root = doc["modules"].get("") is not None  # then the base is never built for real
    sizes: list[int] = []

    def rebuild(
        base: nn.Module | None, built: Callable[[nn.Module], object] | None = None
    ) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # new modules' init must not move the RNG
            try:
                model = _apply(base, doc["modules"], doc["tied"], built)
                _set_attributes(model, doc["attributes"])
            except ModelError as exc:
                raise ModelError(f"{arch_file}: {exc}") from exc
        return model

    def rebuild_on_meta() -> nn.Module:
        sizes.clear()
        base = _build_base_quietly(spec)
        sizes.append(limits.module_bytes(base))
        return rebuild(base, lambda m: sizes.append(limits.module_bytes(m)))

    meta = limits.on_meta(rebuild_on_meta)
    limits.check_weights(meta, header, weights_file)
    try:
        # The base is bounded even when replaced: the model's spec names it, and `bench
        # latency` or `compare` rebuild it from there.
        limits.check_sizes(weights_file, sizes[0], sum(sizes[1:]), meta, spec["name"])
    except ModelError as exc:
        raise ModelError(f"{arch_file}: {exc}") from exc
    del meta
    model = rebuild(None if new_root else _build_base_quietly(spec))
    try:
        _load_weights(model, weights_file)
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise ModelError(f"cannot load weights {weights_file}: {exc}") from exc
    if getattr(model, "eigendamage_spec", None) is None:  # the root itself was replaced
        model.eigendamage_spec = {**spec, "kwargs": dict(spec.get("kwargs", {}))}
    return model


def build_architecture(doc: Mapping[str, Any], *, max_growth: float = 4.0) -> nn.Module:
    """The model an ``architecture.json`` document describes, with freshly initialised
    weights: what latency depends on, without the weights file (benchmarks re-time pruned
    models from their recorded structure).

    The document is checked as :func:`load_model` checks one, and rebuilt on the meta
    device first: described modules may take at most ``max_growth`` times the base's bytes
    (plus 64 MiB), since there is no weights file to bound them by.
    """
    doc = checks.check_document(
        json.loads(json.dumps(doc, allow_nan=False))  # a copy, as plain JSON data
    )
    spec = doc["base"]
    sizes: list[int] = []

    def rebuild(base: nn.Module | None, built=None) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            model = _apply(base, doc["modules"], doc["tied"], built)
            _set_attributes(model, doc["attributes"])
        return model

    def rebuild_on_meta() -> nn.Module:
        base = _build_base_quietly(spec)
        sizes.append(limits.module_bytes(base))
        return rebuild(base, lambda m: sizes.append(limits.module_bytes(m)))

    limits.on_meta(rebuild_on_meta)
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


# --------------------------------------------------------------------------- legacy files

PICKLE_RISK = (
    "unpickling runs whatever code the file's author put in it; pass --allow-pickle only for "
    "files you trust"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _state_dict_in(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The tensors of a state_dict, also inside the usual ``{"state_dict": ...}`` wrappers."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        inner = _state_dict_in(obj.get(key))
        if inner is not None:
            return inner
    return None


def _load_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: Path
) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelError(
            f"checkpoint {source} does not fit the --model architecture: {detail[:300]}"
        ) from None
    return model


def load_model_file(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    build: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Load the model a user points at: a :func:`save_model` directory, a ``.safetensors``
    state_dict, or a legacy ``torch.save`` file.

    Why the opt-in: ``torch.save`` files are pickles, and loading one can execute arbitrary
    code.  They load only with ``allow_pickle``: a whole pickled module with
    ``torch.load(weights_only=False)``, or -- when ``build`` makes the architecture (the
    ``--model`` name) -- a state_dict with ``weights_only=True``.  A pickled module must
    come from ``create_model`` so that its pruned result can be saved pickle-free.  Loading
    one logs a warning naming the file (the ``eigendamage`` logger; the CLI prints it).
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(
            f"checkpoint {p} not found; pass a model directory written by `eigendamage train` "
            "or `eigendamage prune` (its model/ folder)"
        )
    if p.is_dir() or p.name in (ARCHITECTURE_FILE, WEIGHTS_FILE):
        if build is not None:
            raise ModelError(
                f"checkpoint {p} is a model directory that records its own architecture; "
                "drop --model (it is only for state_dict files)"
            )
        return load_model(p)
    if p.suffix == ".safetensors":
        if build is None:
            raise ModelError(
                f"checkpoint {p} holds only weights; pass --model NAME to build the architecture"
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read weights {p}: {_first_line(exc)}") from exc
        return _load_state_dict(build(), state, p)
    if not allow_pickle:
        raise ModelError(
            f"checkpoint {p} is a pickle (torch.save) file, not a model directory; "
            f"{PICKLE_RISK} (add --model NAME if it holds a state_dict)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=build is not None)
    except pickle.UnpicklingError as exc:
        if build is not None:
            raise ModelError(
                f"checkpoint {p} holds pickled objects, not only tensors (a whole model?); "
                "drop --model to load it as a whole pickled model"
            ) from exc
        raise CheckpointError(f"checkpoint {p} is corrupt: {_first_line(exc)}") from exc
    except (ImportError, AttributeError) as exc:  # the pickled classes are not importable
        raise CheckpointError(
            f"checkpoint {p} needs code that is not importable here: {_first_line(exc)}"
        ) from exc
    except Exception as exc:  # zip/EOF errors of a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {p} is corrupt or truncated: {_first_line(exc)}"
        ) from exc
    if build is not None:
        state = _state_dict_in(obj)
        if state is None:
            raise ModelError(f"checkpoint {p} holds no state_dict of tensors")
        return _load_state_dict(build(), state, p)
    if _state_dict_in(obj) is not None:
        raise ModelError(
            f"checkpoint {p} holds a state_dict, not a model; pass --model NAME to build the "
            "architecture it belongs to"
        )
    if not isinstance(obj, nn.Module):
        raise ModelError(f"checkpoint {p} holds a {type(obj).__name__}, not a torch model")
    if not isinstance(getattr(obj, "eigendamage_spec", None), Mapping):
        # Its pruned result could not be saved pickle-free: fail now, not after the run.
        raise ModelError(
            f"checkpoint {p} holds a {type(obj).__name__} not made by eigendamage's model "
            "registry; save its state_dict instead and pass --model NAME"
        )
    # Said once the model is in use (a failed load is one `error:` line already); a state_dict
    # read above went through torch's tensors-only unpickler, which runs no code.
    logging.getLogger("eigendamage").warning(
        "--allow-pickle: unpickling %s runs any code it holds", p
    )
    return obj
