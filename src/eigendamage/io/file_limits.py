"""Memory bounds for loading a model directory: build it on the meta device first, match it
with the weights file's header, and bound what the real build would allocate by the size
of that file (see :mod:`.file_checks` for the checks of ``architecture.json`` itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import EigenDamageError, ModelError
from .file_checks import MAX_MODULES, SHORT_REPR

__all__ = ["check_sizes", "check_weights", "module_bytes", "on_meta", "read_weights_header"]

BYTES_MARGIN = 64 << 20  # non-persistent buffers (position ids, masks) beyond the weights
BASE_RATIO = 100  # a base may be this many times larger than its pruned weights ...
BASE_FLOOR = 512 << 20  # ... or this large, whichever is more

T = TypeVar("T")


# --------------------------------------------------------------------------- meta builds


class _LargeOnMeta(TorchFunctionMode):
    """Fallback for builders that compute their layout with tensors (torchvision's RegNet
    calls ``.tolist()``): only tensors of 4096+ elements are created on the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch.utils._device import _device_constructors

        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            probe = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(probe, torch.Tensor) and probe.numel() >= 4096:
                return probe
        return func(*args, **kwargs)


@contextlib.contextmanager
def _module_budget() -> Iterator[None]:
    """Bound the modules registered while building: millions of tiny layers cost memory and
    time even on the meta device."""
    from torch.nn.modules.module import register_module_module_registration_hook

    count = 0

    def hook(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > MAX_MODULES:
            raise ModelError(f"the model has more than {MAX_MODULES} modules")

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _builder_failed(exc: BaseException | None) -> bool:
    """A builder's own error (perhaps meta-only), not a refusal of the file's content."""
    while exc is not None:
        if not isinstance(exc, EigenDamageError):
            return True
        exc = exc.__cause__
    return False


def on_meta(build: Callable[[], T]) -> T:
    """Run ``build`` with tensors on the meta device (no memory), retrying with only large
    tensors there when a builder needs real values."""
    try:
        with _module_budget(), torch.device("meta"):
            return build()
    except Exception as exc:
        if not _builder_failed(exc):
            raise
    with _module_budget(), _LargeOnMeta():
        return build()


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (persistent or not), shared tensors once."""
    seen: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_sizes(
    weights_file: Path, base: int, built: int, model: nn.Module, base_name: str
) -> None:
    """Bound what the real build will allocate by the weights file's size: the described
    modules by it plus a margin, the base by a generous multiple (pruning shrinks it)."""
    size = weights_file.stat().st_size
    limit = size + BYTES_MARGIN
    for what, n in (("its described modules", built), ("the rebuilt model", module_bytes(model))):
        if n > limit:
            raise ModelError(
                f"{what} would take {_size(n)}, but {weights_file.name} holds {_size(size)}; "
                "refusing to build them"
            )
    base_limit = max(BASE_FLOOR, BASE_RATIO * size)
    if base > base_limit:
        raise ModelError(
            f"base model {base_name!r} would take {_size(base)}, more than {BASE_RATIO}x its "
            f"pruned weights ({_size(size)}); refusing to build it"
        )


# --------------------------------------------------------------------------- weights header

_EXACT = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}


def read_weights_header(weights_file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` from the file's header, without its data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()  # noqa: SIM118 (safe_open is not a Mapping)
            }
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load weights {weights_file}: {exc}") from None


def _dtype_fits(dtype: torch.dtype, stored: str) -> bool:
    if dtype.is_floating_point:  # load_state_dict casts between float widths
        return stored.startswith(("F", "BF"))
    return _EXACT.get(dtype) == stored


def check_weights(
    model: nn.Module, header: Mapping[str, tuple[tuple[int, ...], str]], weights_file: Path
) -> None:
    """The rebuilt (meta) model's state_dict must be the file's tensors exactly: same names,
    shapes and dtype kinds; names the file lacks must be ties of names it holds."""
    own = model.state_dict(keep_vars=True)
    unexpected = [k for k in header if k not in own]
    wrong = []
    for k, v in own.items():
        if k not in header:
            continue
        shape, stored_dtype = header[k]
        if not isinstance(v, torch.Tensor):
            wrong.append(f"{k} is not a tensor")
        elif tuple(v.shape) != shape or not _dtype_fits(v.dtype, stored_dtype):
            wrong.append(f"{k} {list(shape)} {stored_dtype} vs {list(v.shape)} {v.dtype}")
    stored = {id(own[k]) for k in header if k in own}
    missing = [k for k in own if k not in header and id(own[k]) not in stored]
    if unexpected or wrong or missing:
        parts = [
            f"{what} {SHORT_REPR.repr(items)}"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("file vs architecture", wrong),
            )
            if items
        ]
        raise ModelError(f"cannot load weights {weights_file}: {'; '.join(parts)}")
