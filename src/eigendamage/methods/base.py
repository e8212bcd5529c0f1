"""The contract every pruning method keeps, and what one round takes and gives back.

Why a contract: the loop (:mod:`.loop`) runs any method the same way -- check the model,
then per round ``round(model, loader, spec)`` -- so a method is one object in the registry
(:mod:`.registry`), built in or passed by a user, instead of a string dispatched by hand.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from ..criteria.amounts import BudgetKind
from ..curvature.hooks import DataPass
from ..curvature.stability import with_damping_escalation
from ..curvature.types import EigenvalueSource, FisherType
from ..errors import ConfigError
from ..measure import Counts
from .checks import count_on, example_input

Metric = Literal["params", "flops"]
Units = Literal["directions", "channels", "weights"]


class Target(NamedTuple):
    """A round's budget: ``count`` parameters or FLOPs (absolute) to be left at most."""

    metric: Metric
    count: float


@dataclass(frozen=True)
class RoundSpec:
    """Everything one round of any method reads (see :func:`.loop.run_pruning`).

    Exactly one of ``ratio`` (fraction of the method's units removed) and ``target`` is set;
    ``exclude`` holds every module name never pruned (blocks already expanded); ``damping``
    is resolved (never None) and ``seed`` is the round's own.  ``log`` (None: quiet) takes
    one line per stage as it starts and ends (see :meth:`stage`).  Counting and tracing run
    on ``example_inputs`` when set (a tensor, tuple or dict the model takes: token ids of
    a language model), else on zeros of ``input_shape`` (see :meth:`example`, :meth:`count`).
    """

    ratio: float | None
    target: Target | None
    input_shape: tuple[int, ...] | None
    per_layer_cap: float = 0.95
    fisher: FisherType = "true"
    fisher_batches: int | None = None
    fisher_samples: int = 1
    damping: float = 0.0
    exclude: frozenset[str] = frozenset()
    seed: int = 0
    device: torch.device | str | None = None
    eigenvalues: EigenvalueSource = "kfac"
    normalize: bool = False
    log: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    example_inputs: Any = field(default=None, compare=False, repr=False)

    def example(self, model: nn.Module) -> Any:
        """The round's example input on ``model``'s device (for tracing, counting)."""
        return example_input(model, self.input_shape, self.example_inputs)

    def count(self, model: nn.Module) -> Counts:
        """Params and FLOPs of ``model`` on the round's example input."""
        return count_on(model, self.input_shape, self.example_inputs)

    def stage(
        self, name: str, timings: dict[str, float], detail: str = ""
    ) -> AbstractContextManager[None]:
        """:func:`stage` through this round's ``log``."""
        return stage(self.log, name, timings, detail)

    def batches(self, loader: Iterable) -> str:
        """:func:`batches_read` of this round's data pass."""
        return batches_read(loader, self.fisher_batches)

    def data_pass(self) -> DataPass:
        """The settings of the round's passes over the data (K-FAC, EKFAC)."""
        return DataPass(
            self.fisher, self.fisher_batches, self.fisher_samples, self.seed, self.device
        )

    @property
    def budget(self) -> BudgetKind:
        """``"ratio"``, or the metric of the target."""
        return "ratio" if self.target is None else self.target.metric


@contextmanager
def stage(
    log: Callable[[str], None] | None, name: str, timings: dict[str, float], detail: str = ""
) -> Iterator[None]:
    """Time one stage of a round into ``timings[name]``, saying through ``log`` (None:
    quiet) when it starts and how long it took.  Why: curvature, eigendecomposition and
    surgery can each take minutes, with no other sign of life.

    Args:
        log: where the lines go, or None.
        name: the stage (``curvature``, ``eigendecomposition``, ``surgery``, ...).
        timings: the round's seconds per stage.
        detail: what the stage works on (``(10 batches)``, ``of 16 layers``).
    """
    if log is not None:
        log(" ".join(part for part in (name, detail, "...") if part))
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    if log is not None:
        log(f"{name} done in {timings[name]:.1f} s")


def batches_read(loader: Iterable | None, limit: int | None) -> str:
    """How many batches a pass over ``loader`` reads (at most ``limit``), for stage lines."""
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if limit is not None and total is not None:
        return f"({min(limit, total)} batches)"
    n = limit if limit is not None else total
    return f"({n} batches)" if n is not None else "(all batches)"


class Record(Mapping[str, Any]):
    """A typed result that reads like the dict it replaced.

    Subclasses are dataclasses whose fields are the keys (in the order reports show them);
    as a read-only mapping they show the fields that are set (not None), except
    ``internal`` ones (kept for the code, never reported), which only ``[]`` reaches.
    """

    internal: ClassVar[frozenset[str]] = frozenset()

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, None) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        names = self._names()
        return (n for n in names if n not in self.internal and getattr(self, n) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _names(self) -> list[str]:
        return [f.name for f in fields(self)]  # type: ignore[arg-type]


class RoundDetail(Record):
    """Base of each method's round detail: every one has ``removed_units`` and
    ``total_units`` (the loop stops when a round removed none)."""

    removed_units: int
    total_units: int

    def take_masks(self) -> dict[str, torch.Tensor] | None:
        """Kept-weight masks for fine-tuning (weight-level methods), handed over once."""
        return None


@dataclass
class RoundInfo:
    """What one round did: the ratio used, counts after it and time per stage."""

    round: int
    ratio: float
    params: int
    flops: int
    seconds: dict[str, float]
    detail: RoundDetail


class Method(ABC):
    """A pruning method: what it removes, which budgets it takes, and one round of it.

    Attributes:
        name: The name the CLI and ``run_pruning(method=...)`` use.
        description: One line for ``eigendamage methods``: what it scores and removes.
        units: What ``ratio`` is a fraction of: eigen-directions, channels or weights.
        budgets: The budgets it accepts: ``"ratio"``, ``"params"``, ``"flops"``.
        default_damping: Relative damping when the caller gives none.
        takes_normalize: Whether ``normalize=True`` means something to it.
    """

    name: str
    description: str = ""
    units: Units
    budgets: tuple[BudgetKind, ...] = ("ratio", "params", "flops")
    default_damping: float = 1e-3
    takes_normalize: bool = False

    def check(  # noqa: B027
        self, model: nn.Module, input_shape: tuple[int, ...] | None, example_inputs: Any = None
    ) -> None:
        """Raise :class:`~eigendamage.errors.ModelError` when there is nothing in ``model``
        this method can prune (before any run); the default accepts every model.

        Args:
            model: The model to be pruned.
            input_shape: Its input shape (zeros of it are traced), or None with
                ``example_inputs``.
            example_inputs: What the model takes (a tensor, tuple or dict), used instead
                of zeros of ``input_shape`` when given.
        """

    def check_budget(self, budget: BudgetKind) -> None:
        """Raise :class:`ConfigError` for a budget this method does not take."""
        if budget not in self.budgets:
            raise ConfigError(
                f"{self.name} takes a {' or '.join(self.budgets)} budget, not {budget}"
            )

    @abstractmethod
    def round(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """One round on a copy of ``model`` (untouched): the pruned model and what it did.

        Args:
            model: The model to prune (already pruned by earlier rounds).
            loader: Batches for the curvature pass (methods that need none ignore it).
            spec: The round's budget and settings.

        Returns:
            The pruned model and a :class:`RoundInfo` (``round`` is set by the loop).
        """


class DampedMethod(Method):
    """A method that inverts curvature: a round failing on a singular factor is retried
    with ten times the damping (see :mod:`eigendamage.curvature.stability`)."""

    def round(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """:meth:`round_at` the spec's damping, escalated while the curvature is singular."""
        self.check_budget(spec.budget)

        def step(damping: float) -> tuple[nn.Module, RoundInfo]:
            return self.round_at(model, loader, dataclasses.replace(spec, damping=damping))

        return with_damping_escalation(step, spec.damping)

    @abstractmethod
    def round_at(
        self, model: nn.Module, loader: Iterable, spec: RoundSpec
    ) -> tuple[nn.Module, RoundInfo]:
        """One round at exactly ``spec.damping``."""
