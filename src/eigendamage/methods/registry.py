"""The methods by name: the built-in ones, and any a user registers.

Every channel criterion of :data:`eigendamage.criteria.CRITERIA` is a method too, also one
registered there after import (:func:`eigendamage.criteria.register`).
"""

from __future__ import annotations

from ..criteria import CRITERIA
from ..criteria.weight_level import WEIGHT_METHODS
from ..errors import ConfigError, unknown_name
from .base import Method
from .channel import ChannelMethod
from .depthwise import DepthwiseEigenDamage
from .eigendamage import EigenDamage
from .torch_pruning import TP_METHODS, TorchPruning
from .weight_level import WeightLevel

_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` available by its name (replacing a method of that name).

    Args:
        method: An instance of a :class:`~.base.Method` subclass.

    Returns:
        ``method`` itself.

    Raises:
        ConfigError: When ``method`` is not a :class:`~.base.Method` or has no name.
    """
    if not isinstance(method, Method) or not getattr(method, "name", ""):
        raise ConfigError(f"a method must be a named eigendamage Method, got {method!r}")
    _METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    """The names of every method, sorted."""
    return sorted({*_METHODS, *CRITERIA})


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ConfigError: For an unknown name, with the closest names.
    """
    if isinstance(name, str) and name in _METHODS:
        return _METHODS[name]
    if isinstance(name, str) and name in CRITERIA:  # a criterion registered after import
        return register_method(ChannelMethod(name))
    raise ConfigError(unknown_name("method", name, available_methods()))


def check_normalize(method: str | Method, normalize: bool) -> None:
    """``normalize`` (each layer's scores over their sum) exists for the channel criteria
    only: every other method (EigenDamage, obd/obs, tp-*) would silently ignore it."""
    if not isinstance(normalize, bool):
        raise ConfigError(f"normalize must be True or False, got {normalize!r}")
    if not normalize:
        return
    if isinstance(method, Method):
        name, takes = method.name, method.takes_normalize
    else:
        name = method
        takes = name in available_methods() and get_method(name).takes_normalize
    if not takes:
        takers = sorted(n for n in available_methods() if get_method(n).takes_normalize)
        raise ConfigError(
            f"normalize applies to the channel criteria ({', '.join(takers)}), not to {name!r}"
        )


for _method in (
    EigenDamage(),
    DepthwiseEigenDamage(),
    *(WeightLevel(name) for name in WEIGHT_METHODS),
    *(TorchPruning(name) for name in TP_METHODS),
    *(ChannelMethod(name) for name in CRITERIA),
):
    register_method(_method)
