"""The one budget search: the point on a method's pruning scale that meets a params/FLOPs
budget.

Every method has a scale on which more pruning never leaves more parameters or FLOPs: a
number of ranked channels (channel criteria), a ratio of eigen-directions (EigenDamage and
its depthwise form), Torch-Pruning's ``pruning_ratio``.  :func:`solve_budget` bisects it
and lands within ``tolerance`` of the target or, when the units are too coarse for that,
takes the nearest model at or under the target and says so in one log line: a budget is
a ceiling, and a near miss is no reason to fail a long run.  Only a target that pruning as
far as the caps allow cannot reach is a :class:`ConfigError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from torch import nn

from ..errors import ConfigError
from .base import Target
from .checks import count_on

T = TypeVar("T")
logger = logging.getLogger("eigendamage")


@dataclass(frozen=True)
class Solved(Generic[T]):
    """Where the search stopped: the point, its measured value and what measuring made."""

    point: float
    value: float
    made: T


@dataclass(frozen=True)
class Scale:
    """How to walk a method's scale ``[0, hi]``.

    ``steps_of_one``: the scale counts units; bisect to two neighbours and take the closer
    one (else: stop at the first point within tolerance, after at most ``steps`` halvings
    or once the interval is narrower than ``resolution``).  ``accept_hi``: ``"within"``
    takes ``hi`` when it is within tolerance, ``"above"`` when it is above the goal (and
    within tolerance), ``"never"`` searches on.
    """

    hi: float
    steps_of_one: bool = False
    steps: int = 30
    resolution: float = 0.0
    accept_hi: Literal["never", "within", "above"] = "never"


def solve_budget(
    measure: Callable[[float], tuple[float, T]],
    goal: float,
    scale: Scale,
    *,
    label: str,
    unreachable: Callable[[float], str],
    value_format: str = ",.0f",
    tolerance: float = 0.01,
) -> Solved[T]:
    """The point of ``scale`` whose ``measure`` meets ``goal``.

    Args:
        measure: ``point -> (value, what was built)``; the value never grows with the point.
        goal: The value to reach (a count, or a kept fraction).
        scale: The scale and how to search it.
        label: The target as log lines name it (``"target params 12,345"``).
        unreachable: The error message for the value at ``scale.hi`` above the goal.
        value_format: How log lines show values.
        tolerance: Relative distance to the goal that counts as met.

    Returns:
        The solved point with its value and what measuring it built.

    Raises:
        ConfigError: When even ``scale.hi`` leaves more than the goal allows.
    """
    lo: float = 0
    hi = scale.hi
    top, made = measure(hi)
    if top > goal * (1 + tolerance):
        raise ConfigError(unreachable(top))
    within = abs(top - goal) <= tolerance * goal
    if (scale.accept_hi == "within" and within) or (scale.accept_hi == "above" and top > goal):
        return Solved(hi, top, made)
    under = Solved(hi, top, made) if top <= goal else None  # the largest value at or under
    best = Solved(hi, top, made)  # the closest to the goal
    if scale.steps_of_one:
        bottom, made_lo = measure(lo)
        if bottom <= goal:
            return Solved(lo, bottom, made_lo)
        above, under = Solved(lo, bottom, made_lo), Solved(hi, top, made)
        while under.point - above.point > 1:  # neighbours around the goal
            mid = (above.point + under.point) // 2
            value, made = measure(mid)
            if value > goal:
                above = Solved(mid, value, made)
            else:
                under = Solved(mid, value, made)
        best = min((above, under), key=lambda s: abs(s.value / goal - 1))
        if abs(best.value / goal - 1) <= tolerance:
            return best
    else:
        for _ in range(scale.steps):
            if hi - lo <= scale.resolution:
                break
            mid = 0.5 * (lo + hi)
            value, made = measure(mid)
            if abs(value - goal) <= tolerance * goal:
                return Solved(mid, value, made)
            if abs(value - goal) < abs(best.value - goal):
                best = Solved(mid, value, made)
            if value > goal:
                lo = mid
            else:
                hi = mid
                if under is None or value > under.value:
                    under = Solved(mid, value, made)
    if under is None:  # only when every point measured stayed above the goal
        return best
    logger.warning(
        f"{label} cannot be met within {100 * tolerance:g}%; took the nearest model under "
        f"it, {under.value:{value_format}} ({under.value / goal:.3f} of the target)"
    )
    return under


def solve_ratio(
    build: Callable[[float], nn.Module],
    target: Target | tuple[str, float],
    input_shape: tuple[int, ...] | None,
    *,
    example_inputs: Any = None,
    tolerance: float = 0.01,
    max_ratio: float = 0.999,
    steps: int = 30,
) -> float:
    """The ratio of ``build(ratio)`` (a pruned model) that meets ``target``: the
    eigen-direction ratio of EigenDamage, see :func:`solve_budget`; counted on
    ``example_inputs`` when given, else on ``input_shape``."""
    metric, goal = target

    def measure(r: float) -> tuple[float, None]:
        return getattr(count_on(build(r), input_shape, example_inputs), metric), None

    return solve_budget(
        measure,
        goal,
        Scale(max_ratio, steps=steps),
        label=f"target {metric} {goal:,.0f}",
        unreachable=lambda left: (
            f"target {metric} {goal:,.0f} is unreachable: pruning as far as the per-layer cap "
            f"allows leaves {left:,.0f}; raise per_layer_cap or use more rounds"
        ),
        tolerance=tolerance,
    ).point
