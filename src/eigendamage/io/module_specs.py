"""The module types a model directory can describe: how each is written to
``architecture.json`` (its constructor arguments) and rebuilt from it.

Why a registry: a pruned model is a *different architecture* from the one its constructor
builds (thinner convs, K-FAC eigenbasis bottlenecks), and rebuilding it must never run code
named by the file: only the types registered here can be built, with checked arguments.
Built in: torch's common layers, ``KFEBottleneck`` and the timm layers channel pruning
resizes (both registered when first needed).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import ModelError
from .file_checks import check_args, check_description

__all__ = ["ModuleType", "register_module_type"]


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
        from ..surgery.eigenbasis import KFEBottleneck
    except ImportError:
        return
    register_module_type(
        "KFEBottleneck",
        lambda m: {},
        lambda args, ch: KFEBottleneck(ch["rot_in"], ch["core"], ch["rot_out"]),
        cls=KFEBottleneck,
        container=True,
    )


@functools.cache
def _register_timm_types() -> None:
    """The timm layers that channel pruning resizes: norms (``BatchNormAct2d`` holds its
    activation and dropout as children), timm's ``Linear`` and ``Conv2dSame``.  Registered
    when a timm module or a ``timm.`` entry is first met (timm is optional and slow to
    import); the ``timm.`` prefix keeps torch's own entries intact."""
    try:
        from timm.layers import BatchNormAct2d, Conv2dSame, LayerNorm, LayerNorm2d
        from timm.layers import Linear as TimmLinear
    except ImportError:
        return

    def build_bn_act(args: dict[str, Any], children: dict[str, nn.Module]) -> nn.Module:
        module = BatchNormAct2d(**args)
        for child, value in children.items():  # the activation and dropout as saved
            setattr(module, child, value)
        return module

    register_module_type(
        "timm.BatchNormAct2d",
        lambda m: _args(m, "num_features", "eps", "momentum", "affine", "track_running_stats"),
        build_bn_act,
        cls=BatchNormAct2d,
        container=True,
        init_args=True,
    )

    def ln_args(m: nn.Module) -> dict[str, Any]:
        shape, affine = m.normalized_shape[0], m.elementwise_affine
        return {"num_channels": shape, "eps": m.eps, "affine": affine}

    def conv_args(m: nn.Module) -> dict[str, Any]:
        names = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups")
        return {**{k: getattr(m, k) for k in names}, "bias": m.bias is not None}

    describe = {
        LayerNorm: ln_args,
        LayerNorm2d: ln_args,
        TimmLinear: _linear_args,
        Conv2dSame: conv_args,
    }
    for cls, args in describe.items():
        register_module_type(
            f"timm.{cls.__name__}", args, lambda a, ch, c=cls: c(**a), cls=cls, init_args=True
        )


def _lookup(module: nn.Module) -> ModuleType | None:
    _register_kfe_bottleneck()
    if type(module).__module__.startswith("timm."):
        _register_timm_types()
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


def _describable(module: nn.Module) -> bool:
    """True when :func:`_describe` can write ``module`` whole: a registered type, and for a
    container every child too (a ``Sequential`` of user blocks is not)."""
    entry = _lookup(module)
    if entry is None:
        return False
    children = module._modules.values()
    return not entry.container or all(c is not None and _describable(c) for c in children)


def _build(desc: Mapping[str, Any], path: str, depth: int = 1) -> nn.Module:
    """Rebuild one described module; its JSON is checked first (it may come from anyone)."""
    type_name, args, child_descs = check_description(desc, path, depth)
    _register_kfe_bottleneck()
    if type_name.startswith("timm."):
        _register_timm_types()
    entry = _REGISTRY.get(type_name)
    if entry is None:
        raise ModelError(f"architecture entry for {path!r} has unknown module type {type_name!r}")
    check_args(args, entry.cls if entry.init_args else None, path)
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
