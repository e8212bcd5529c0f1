"""The Method contract: every built-in name resolves to a Method, a user's own method runs
through the same loop, and round details read like the dicts they replaced."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from eigendamage.errors import ConfigError
from eigendamage.measure import count
from eigendamage.methods import (
    Method,
    RoundDetail,
    RoundInfo,
    RoundSpec,
    Target,
    available_methods,
    get_method,
    register_method,
    run_pruning,
)
from eigendamage.methods.budget import Scale, solve_budget


@dataclass(kw_only=True)
class HalfDetail(RoundDetail):
    removed_units: int
    total_units: int
    note: str | None = None


class HalveFirstLayer(Method):
    """Keeps the first half of the first Linear's outputs (and the next layer's inputs)."""

    name = "halve-first"
    units = "channels"
    budgets = ("ratio",)

    def round(self, model, loader, spec):
        new = copy.deepcopy(model)
        first, second = new[0], new[2]
        keep = first.out_features // 2
        with torch.no_grad():
            new[0] = nn.Linear(first.in_features, keep)
            new[0].weight.copy_(first.weight[:keep])
            new[0].bias.copy_(first.bias[:keep])
            new[2] = nn.Linear(keep, second.out_features)
            new[2].weight.copy_(second.weight[:, :keep])
            new[2].bias.copy_(second.bias)
        counts = count(new, spec.input_shape)
        detail = HalfDetail(removed_units=first.out_features - keep, total_units=first.out_features)
        return new, RoundInfo(0, spec.ratio, counts.params, counts.flops, {}, detail)


def test_every_name_is_a_method_and_unknown_names_are_config_errors() -> None:
    for name in available_methods():
        method = get_method(name)
        assert isinstance(method, Method) and method.name == name
    assert get_method("eigendamage").default_damping == 0.0
    assert get_method("obd").budgets == ("ratio",)
    with pytest.raises(ConfigError, match="Did you mean 'eigendamage'"):
        get_method("eigendamag")


def test_a_users_method_runs_through_the_loop_by_instance_and_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loader = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    result = run_pruning(model, loader, method=HalveFirstLayer(), ratio=0.5)
    assert result.model[0].out_features == 4 and result.rounds[0].detail["removed_units"] == 4
    assert dict(result.rounds[0].detail) == {"removed_units": 4, "total_units": 8}
    register_method(HalveFirstLayer())
    try:
        assert "halve-first" in available_methods()
        twice = run_pruning(model, loader, method="halve-first", ratio=0.5, rounds=2)
        assert twice.model[0].out_features == 2
        with pytest.raises(ConfigError, match="ratio"):
            run_pruning(model, loader, method="halve-first", target_params=0.5)
    finally:
        from eigendamage.methods import registry

        registry._METHODS.pop("halve-first", None)


def test_round_spec_and_target_are_typed_values() -> None:
    spec = RoundSpec(ratio=None, target=Target("flops", 10.0), input_shape=(1, 4))
    assert spec.budget == "flops" and spec.target.metric == "flops"
    with pytest.raises(AttributeError):
        spec.ratio = 0.5  # frozen


def test_one_budget_search_takes_the_nearest_point_under_a_coarse_goal() -> None:
    """Units two apart: a goal between them cannot be met, the point under it is taken."""

    def measure(k: float) -> tuple[float, None]:
        return 10.0 - 2 * int(k), None

    solved = solve_budget(measure, 5.0, Scale(5, steps_of_one=True), label="goal", unreachable=str)
    assert solved.point == 3 and solved.value == 4.0
    with pytest.raises(ConfigError):
        solve_budget(measure, -1.0, Scale(5, steps_of_one=True), label="goal", unreachable=str)
