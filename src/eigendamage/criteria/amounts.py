"""How much to prune: the one validation of ratios, budget fractions and caps.

Why one place: every entry point (``run_pruning``, ``channel_prune``, ``weight_prune``,
``plan_pruning``) takes fractions, and each used to check them its own way (NaN passed some
of them).  Each now states its interval and gets the same message naming the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

from ..errors import ConfigError

BudgetKind = Literal["ratio", "params", "flops"]


def check_fraction(
    name: str, value: Any, *, low: float = 0.0, high: float = 1.0, open_low: bool, open_high: bool
) -> float:
    """``value`` as a float, or a :class:`ConfigError` unless it is a finite real number in
    the interval (spelt out in the message)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        ok = above and below
    if not ok:
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def one_budget(
    ratio: float | None,
    target_params: float | None,
    target_flops: float | None,
    *,
    ratio_open: tuple[bool, bool] = (True, True),
) -> tuple[BudgetKind, float]:
    """``(kind, value)`` of the one budget given: ``ratio`` (the fraction removed, in
    ``(0, 1)``; ``ratio_open`` says which ends are open) or a kept fraction ``target_*`` in
    ``(0, 1]``; a :class:`ConfigError` for none, several, or a value out of range."""
    given: list[tuple[BudgetKind, str, float | None]] = [
        ("ratio", "ratio", ratio),
        ("params", "target_params", target_params),
        ("flops", "target_flops", target_flops),
    ]
    named = [(kind, name, v) for kind, name, v in given if v is not None]
    if len(named) != 1:
        raise ConfigError(
            "give exactly one of ratio, target_params or target_flops"
            + (f" (got {', '.join(name for _, name, _ in named)})" if named else "")
        )
    ((kind, name, value),) = named
    if kind == "ratio":
        low, high = ratio_open
        return kind, check_fraction(name, value, open_low=low, open_high=high)
    return kind, check_fraction(name, value, open_low=True, open_high=False)  # the fraction kept
