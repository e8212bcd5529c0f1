"""The Fisher diagonal in the Kronecker-factored eigenbasis, re-estimated (EKFAC).

K-FAC's diagonal in the KFE is ``lam_S[o] * lam_A[i]``; George et al. (2018) showed that
re-estimating it as ``E_n[(Q_S^T G_n Q_A)^2]`` -- the second moment of per-example
gradients expressed in the eigenbasis -- is the best diagonal approximation in that basis
(it is exactly the diagonal of the empirical/true Fisher of the rotated weights).

For a conv layer with the EigenDamage channel basis, the rotated per-example gradient of
the core weight at kernel offset ``s`` is ``sum_t (Q_S^T g_t)(Q_A^T x_{t,s})^T``, so the
diagonal is shaped ``(d_out, d_in, kh*kw)``: one value per core weight.  Needs a second
pass over the data (after the eigendecomposition).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ModelError
from ..layers import adapter_of
from .factors import KFE
from .hooks import DataPass, LayerCall, resolve_targets
from .types import FisherType

_CHUNK = 1 << 24  # elements of per-example gradients held at once


def _rotated_square_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_n (sum_t g_{n,t} a_{n,t,...}^T)^2`` for ``g`` (N,T,O) and ``a`` (N,T,I,K)."""
    n, _, o = g.shape
    per_example = o * a.shape[2] * a.shape[3]
    chunk = max(1, _CHUNK // max(1, per_example))
    total = g.new_zeros(o, a.shape[2], a.shape[3])
    for start in range(0, n, chunk):
        grads = torch.einsum("nto,ntik->noik", g[start : start + chunk], a[start : start + chunk])
        total += grads.square().sum(0)
    return total


def kfe_diagonal(
    model: nn.Module,
    loader: Iterable,
    kfe: dict[str, KFE],
    *,
    fisher: FisherType = "true",
    batches: int | None = None,
    samples: int = 1,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """EKFAC diagonal per layer of ``kfe`` (eigenbases of channel-mode A without bias, S).

    Returns ``{name: (d_out, d_in, K)}`` (K = kh*kw, 1 for Linear), in the same units as
    ``KFE.diag`` so either can rank eigen-directions.  Grouped convs are not supported.
    """
    targets = resolve_targets(model, kfe.keys())
    for name, module in targets.items():
        if getattr(module, "groups", 1) != 1:
            raise ModelError(f"layer {name!r}: EKFAC diagonal of grouped convs is not supported")
    sums: dict[str, torch.Tensor] = {}
    num_examples = 0
    data = DataPass(fisher=fisher, batches=batches, samples=samples, seed=seed, device=device)
    for n, per_layer in data.layer_calls(model, loader, targets):
        num_examples += n
        for name, calls in per_layer.items():
            dev = calls[0].inputs.device
            for call in calls:
                g, a = _rotated_rows(targets[name], kfe[name], call, dtype, dev)
                contribution = _rotated_square_sum(g, a)
                sums[name] = contribution if name not in sums else sums[name] + contribution
    return {name: total / max(num_examples, 1) for name, total in sums.items()}


def _rotated_rows(
    module: nn.Module, kfe: KFE, call: LayerCall, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call's output gradients ``(N, T, O)`` and inputs ``(N, T, I, K)`` in the KFE."""
    adapter = adapter_of(module)
    q_a = kfe.A.Q.to(device=device, dtype=dtype)
    q_s = kfe.S.Q.to(device=device, dtype=dtype)
    g = adapter.output_rows(call.grad_output.to(dtype))[:, 0] @ q_s  # (N, T, O')
    rows = adapter.input_rows(module, call.inputs.to(dtype))[:, 0]  # (N, T, C*K)
    if adapter.kind == "linear":
        return g, (rows @ q_a).unsqueeze(-1)  # (N, T, I, 1)
    u = rows.reshape(rows.shape[0], rows.shape[1], -1, adapter.kernel_numel(module))
    return g, torch.einsum("ntck,ci->ntik", u, q_a)  # (N, T, I, K)
