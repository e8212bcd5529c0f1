"""Multi-process jobs with ``torch.distributed`` (``torchrun``): process group, rank-0
outputs, DDP fine-tuning and sharded loaders.

Everything here is a no-op in a plain single process, so callers use it unconditionally:

* :func:`init_from_env` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and joins
  the process group (NCCL on GPU, gloo on CPU), pinning each rank to its local GPU;
* :func:`is_main` / :func:`on_main`: only rank 0 writes files and prints; ``on_main`` runs a
  function on rank 0 and hands its result -- or its exception -- to every rank, so a
  refused output directory stops all ranks instead of leaving the others waiting forever
  in the next collective;
* :func:`wrap_ddp` and :func:`shard_loader` turn a model and a training loader into their
  DDP forms; :func:`broadcast_module` makes every rank hold rank 0's weights.

Curvature needs nothing from the caller: ``collect_kfac`` and ``eigendecompose`` detect the
process group and split the work themselves (:mod:`eigendamage.curvature.distributed`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler

from .curvature.distributed import all_reduce_sum_, broadcast_, group_info
from .curvature.factors import KFactors
from .errors import ConfigError

T = TypeVar("T")
# What a sharded training loader keeps of the loader it replaces.
_KEPT_LOADER_SETTINGS = ("num_workers", "collate_fn", "pin_memory", "drop_last", "worker_init_fn")

__all__ = [
    "DistInfo",
    "ShardedSampler",
    "all_reduce_factors",
    "barrier",
    "broadcast_module",
    "init_from_env",
    "is_distributed",
    "is_main",
    "on_main",
    "only_main",
    "rank",
    "shard_loader",
    "unwrap",
    "world_size",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, number of ranks, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that torchrun describes in the environment (idempotent).

    Without ``WORLD_SIZE > 1`` in the environment nothing happens and a single-process
    :class:`DistInfo` is returned.  ``backend`` defaults to NCCL when CUDA is available
    and gloo otherwise; with CUDA each rank is pinned to GPU ``LOCAL_RANK``, so
    ``--device cuda`` means "this rank's GPU".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def only_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` on rank 0, a do-nothing function elsewhere: for loggers and writers."""
    return fn if is_main() else _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception.

    The result (or exception) must be picklable; it travels by ``broadcast_object_list``.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as exc:  # handed to every rank, re-raised below
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0, device=_object_device())
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _object_device() -> torch.device | None:
    if dist.get_backend() != "nccl":
        return None
    return torch.device("cuda", torch.cuda.current_device())


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed (gradients averaged over ranks
    in buckets during backward), else ``model`` itself.  ``model`` must already be on this
    rank's device; BatchNorm keeps per-rank batch statistics (buffers follow rank 0)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if device.type != "cuda":
        return DistributedDataParallel(model, **ddp_kwargs)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(model, device_ids=[index], **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (what to save, prune or evaluate)."""
    return getattr(model, "module", model)


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share of one permutation that all ranks draw alike.

    Like ``DistributedSampler`` (indices padded to a multiple of ``world_size`` so every
    rank runs the same number of steps, as DDP requires), but the permutation comes from
    the sampler's own ``generator`` -- which ``train.reseed_loader`` reseeds at every epoch,
    so the shuffle depends on ``(seed, epoch)`` only, identically on every rank.
    """

    def __init__(self, n: int, rank: int, world: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.rank, self.world, self.shuffle = n, rank, world, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        order = (
            torch.randperm(self.n, generator=self.generator).tolist()
            if self.shuffle
            else list(range(self.n))
        )
        total = len(self) * self.world
        order += order[: total - self.n]
        return iter(order[self.rank : total : self.world])


def shard_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A per-rank DataLoader over the same dataset, each rank taking ``1/world_size`` of the
    examples with batch size ``batch_size / world_size``: the global batch (and so the
    learning rate and schedule) stays what a single process uses.  Identity when not
    distributed."""
    if not is_distributed():
        return loader
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            f"distributed training needs a torch DataLoader to shard, got {type(loader).__name__}"
        )
    world = world_size()
    if loader.batch_size is None or loader.batch_size % world:
        raise ConfigError(
            f"batch size {loader.batch_size} is not divisible by the {world} ranks; choose a "
            "batch size that is, so each rank gets an equal share of every global batch"
        )
    sampler = ShardedSampler(
        len(loader.dataset), rank(), world, isinstance(loader.sampler, RandomSampler), seed
    )
    kept = {name: getattr(loader, name) for name in _KEPT_LOADER_SETTINGS}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size // world,
        sampler=sampler,
        generator=sampler.generator,
        **kept,
    )


def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place).

    For states that must agree exactly across ranks, e.g. a model loaded on one rank only.
    Shapes must already match (same architecture on every rank).
    """
    if is_distributed():
        tensors = [t.data for t in (*module.parameters(), *module.buffers())]
        broadcast_(tensors, src=src)
    return module


def all_reduce_factors(factors: dict[str, KFactors]) -> dict[str, KFactors]:
    """Merge K-FAC factors that each rank estimated on *its own* data into the factors of
    all the data: ``A`` weighted by its row count, ``S`` and the diagonal by examples.

    For factors computed with ``collect_kfac(..., distributed=False)`` on a per-rank loader;
    ``collect_kfac`` does this itself (on the raw sums) when it sees a process group.
    """
    if group_info(None) is None:
        return factors
    names = list(factors)
    sums: list[torch.Tensor] = []
    for n in names:
        f = factors[n]
        sums += [f.A * f.a_count, f.S * f.num_examples]
        if "diag" in f.extra:
            sums.append(f.extra["diag"] * f.num_examples)
    device = sums[0].device
    fields = ("a_count", "num_examples", "a_rank_bound", "s_rank_bound")
    counts = torch.tensor(
        [getattr(factors[n], c) for n in names for c in fields],
        dtype=torch.float64,
        device=device,
    )
    all_reduce_sum_([*sums, counts])
    out, it = {}, iter(sums)
    for n, summed in zip(names, counts.reshape(-1, len(fields)).long().tolist(), strict=True):
        f, c = factors[n], dict(zip(fields, summed, strict=True))
        extra = dict(f.extra)
        a, s = next(it) / c["a_count"], next(it) / c["num_examples"]
        if "diag" in f.extra:
            extra["diag"] = next(it) / c["num_examples"]
        out[n] = replace(f, A=a, S=s, extra=extra, **c)
    return out
