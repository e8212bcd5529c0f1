"""Collective operations behind distributed curvature (``torch.distributed``).

Factor collection is a sum over batches, so ranks that each took a share of the batches
combine *sums* and *counts* with one all-reduce and then normalise: the result equals the
single-process factors on the same batches up to float summation order.  Many factors are
packed into a few flat buckets so a net with hundreds of layers costs a handful of calls.

Eigendecompositions are independent per factor: each rank decomposes the factors assigned
to it -- balanced by the ``O(d^3)`` cost with the longest-processing-time rule -- and every
rank receives all results by one broadcast per rank.

NCCL only moves CUDA tensors: CPU tensors are staged through the current CUDA device when
the process group runs on NCCL, so every function here is device-agnostic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError, CurvatureError

BUCKET_BYTES = 64 << 20  # flat all-reduce buffers of at most this size (one per dtype/device)


def group_info(distributed: bool | None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when collectives are to be used, else None.

    ``distributed=None`` means: when a default process group is initialised and has more
    than one rank.  ``True`` demands one; ``False`` never communicates.
    """
    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return (
            (dist.get_rank(), dist.get_world_size())
            if ready and dist.get_world_size() > 1
            else None
        )
    if not distributed:
        return None
    if not ready:
        raise ConfigError(
            "distributed=True needs an initialised torch.distributed process group: run under "
            "torchrun and call eigendamage.distributed.init_from_env() first"
        )
    return dist.get_rank(), dist.get_world_size()


def _staging_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), each group cut at ``limit`` bytes."""
    groups: dict[tuple, list[list[int]]] = {}
    sizes: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in groups or sizes[key] + nbytes > limit:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [bucket for per_key in groups.values() for bucket in per_key]


def all_reduce_sum_(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum every tensor over all ranks, in place, with one call per bucket."""
    for idx in _buckets(tensors, bucket_bytes):
        parts = [tensors[i] for i in idx]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(_staging_device(parts[0]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def broadcast_(tensors: Sequence[torch.Tensor], src: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, bucketed like above."""
    for idx in _buckets(tensors, bucket_bytes):
        parts = [tensors[i] for i in idx]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(_staging_device(parts[0]))
        dist.broadcast(flat, src=src)
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def assign_by_cost(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: largest first onto the least-loaded rank (LPT, <= 4/3 of the
    optimal makespan); ties go to the lowest rank so every rank computes the same map."""
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def distributed_eigh(
    mats: Sequence[torch.Tensor],
    decompose: Callable[[list[torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]],
    rank: int,
    world: int,
    costs: Sequence[float] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``decompose`` each rank's share of ``mats`` (by ``costs``, default ``d^3`` each) and
    share all results.

    Returns ``(lam, Q)`` per matrix, like ``decompose``; results have the input's dtype and
    device on every rank.
    """
    if costs is None:
        costs = [m.numel() * m.shape[-1] for m in mats]
    owners = assign_by_cost(costs, world)
    mine = [i for i, o in enumerate(owners) if o == rank]
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mats)
    error: Exception | None = None
    try:
        for i, res in zip(mine, decompose([mats[i] for i in mine]), strict=True):
            results[i] = res
    except (CurvatureError, torch.linalg.LinAlgError) as exc:
        error = exc
    # Agree on failure first: a rank must not wait in a broadcast that its owner never sends.
    failed = torch.tensor([float(error is not None)], device=mats[0].device if mats else "cpu")
    all_reduce_sum_([failed])
    if error is not None:
        raise error
    if failed.item() > 0:
        raise CurvatureError(
            "the eigendecomposition failed on another rank; raise the damping or use more batches"
        )
    for i, m in enumerate(mats):
        if results[i] is None:
            results[i] = (m.new_empty(m.shape[:-1]), torch.empty_like(m))
    for src in range(world):
        owned = [t for i, o in enumerate(owners) if o == src for t in results[i]]  # type: ignore[union-attr]
        if owned:
            broadcast_(owned, src=src)
    return results  # type: ignore[return-value]
