"""The channel-criterion protocol and registry.

A criterion turns a model (plus the curvature it declares in ``needs``) into one score per
output channel of each scored layer.  Hessian criteria return the estimated loss increase
``Delta L`` of removing that channel (with the 1/2), in the same units for every layer, so
one global threshold ranks all channels; the others (l1, random, slimming) return a
saliency that only ranks.  OBS criteria also return the compensating update of the
surviving weights of a layer whose output rows are removed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..curvature import collect_kfac
from ..curvature.factors import KFactors
from ..curvature.hooks import DataPass
from ..curvature.types import ConvMode
from ..errors import ConfigError, unknown_name

NEEDS = frozenset({"kfac", "diag", "bn"})
RANKINGS = ("global", "layer")


@dataclass
class ScoreContext:
    """What a criterion may read.

    ``layers``: Conv/Linear layers whose output channels can be removed (group roots);
    ``norm_layers``: BatchNorm layers inside prunable groups; ``factors``: K-FAC factors of
    ``layers`` (with ``extra["diag"]`` when the criterion needs "diag"); ``damping``:
    relative Tikhonov damping of factor inverses; ``seed``: for random choices.
    """

    layers: list[str]
    norm_layers: list[str] = field(default_factory=list)
    factors: Mapping[str, KFactors] = field(default_factory=dict)
    damping: float = 1e-3
    seed: int = 0


def collect_factors(
    model: nn.Module,
    loader: Iterable | None,
    data: DataPass,
    modules: Iterable[str] | None,
    *,
    needed_by: str,
    diag: bool = False,
    conv_mode: ConvMode = "patch",
) -> dict[str, KFactors]:
    """K-FAC factors of ``modules`` from a pass over ``loader`` as ``data`` says (with the
    diagonal Fisher if ``diag``); a :class:`ConfigError` naming ``needed_by`` without data."""
    if loader is None:
        raise ConfigError(f"{needed_by} needs curvature: pass a data loader (or factors=)")
    return collect_kfac(
        model, loader, fisher=data.fisher, batches=data.batches, samples=data.samples,
        seed=data.seed, device=data.device, conv_mode=conv_mode, modules=modules, diag=diag,
    )  # fmt: skip


class ChannelCriterion(ABC):
    """Base class: ``name``, ``needs`` (subset of {"kfac", "diag", "bn"}), ``score``, ``update``.

    ``ranking``: ``"global"`` (one threshold over all layers' scores: the Hessian criteria,
    whose scores share one unit) or ``"layer"`` (every layer loses the same fraction, its
    own lowest: for saliencies that are not comparable across layers, as in Li et al.).
    """

    name: str = ""
    needs: frozenset[str] = frozenset()
    ranking: str = "global"

    @abstractmethod
    def score(self, model: nn.Module, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        """``{layer name: per-output-channel score}``; lower = removed first."""

    def update(
        self, model: nn.Module, ctx: ScoreContext, pruned: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """OBS compensation ``{layer: Delta W}`` for removing rows ``pruned[layer]``.

        ``Delta W`` is shaped like ``weight.flatten(1)`` (+ a bias column when the layer's
        factors have one).  ``None``: the criterion has no update (OBD-type methods).
        """
        return None


CRITERIA: dict[str, ChannelCriterion] = {}


def register(criterion: ChannelCriterion) -> ChannelCriterion:
    """Add ``criterion`` to :data:`CRITERIA` under its name."""
    if not criterion.needs <= NEEDS:
        raise ValueError(f"criterion {criterion.name!r}: unknown needs {criterion.needs - NEEDS}")
    if criterion.ranking not in RANKINGS:
        raise ValueError(f"criterion {criterion.name!r}: ranking must be one of {RANKINGS}")
    CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> ChannelCriterion:
    """The registered criterion ``name``; a :class:`ConfigError` with close matches if unknown."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise ConfigError(unknown_name("channel pruning method", name, CRITERIA)) from None


def require_factors(ctx: ScoreContext, name: str, criterion: str, diag: bool = False) -> KFactors:
    """The factors of layer ``name``, or a :class:`ConfigError` saying what to collect."""
    f = ctx.factors.get(name)
    if f is None:
        raise ConfigError(f"{criterion}: no K-FAC factors for layer {name!r}; collect them first")
    if diag and "diag" not in f.extra:
        raise ConfigError(
            f"{criterion}: layer {name!r} has no diagonal Fisher; use collect_kfac(diag=True)"
        )
    return f


class GlobalRanking:
    """One global threshold over the units of many sets, with a cap per set.

    ``removed(k)`` removes the ``k`` lowest-scoring units overall (ties broken by position,
    so it is deterministic), except that set ``key`` loses at most ``caps[key]`` units, its
    own lowest.  Monotone in ``k``: a larger ``k`` never restores a unit, which makes
    bisection on ``k`` for a parameter or FLOP budget valid.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], caps: Mapping[str, int]) -> None:
        self.keys = list(scores)
        flat = [scores[key].detach().flatten().to("cpu", torch.float64) for key in self.keys]
        self.scores = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
        self.owner = torch.repeat_interleave(
            torch.arange(len(flat)), torch.tensor([len(s) for s in flat], dtype=torch.long)
        )
        self.order = torch.argsort(self.scores, stable=True)
        self.local_order = [torch.argsort(s, stable=True) for s in flat]
        self.caps = torch.tensor([int(caps[key]) for key in self.keys], dtype=torch.long)

    @property
    def total(self) -> int:
        """Number of units over all sets."""
        return len(self.scores)

    def removed(self, k: int) -> dict[str, torch.Tensor]:
        """``{key: sorted removed unit indices}`` (keys with none removed are left out)."""
        counts = torch.bincount(self.owner[self.order[:k]], minlength=len(self.keys))
        counts = torch.minimum(counts, self.caps)
        return {
            key: self.local_order[i][: counts[i]].sort().values
            for i, key in enumerate(self.keys)
            if counts[i] > 0
        }

    def threshold(self, k: int) -> float:
        """The global threshold: the ``k``-th lowest score (``-inf`` for ``k == 0``)."""
        return float(self.scores[self.order[k - 1]]) if k > 0 else float("-inf")
