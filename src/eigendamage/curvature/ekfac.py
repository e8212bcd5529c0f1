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
from .factors import KFE
from .hooks import iterate_layer_calls, resolve_targets
from .patches import grad_rows, linear_rows, unfold_patches

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
    fisher: str = "true",
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
    for n, per_layer in iterate_layer_calls(
        model,
        loader,
        targets,
        fisher=fisher,
        batches=batches,
        samples=samples,
        seed=seed,
        device=device,
    ):
        num_examples += n
        for name, calls in per_layer.items():
            module = targets[name]
            q_a = kfe[name].A.Q.to(device=calls[0].inputs.device, dtype=dtype)
            q_s = kfe[name].S.Q.to(device=calls[0].inputs.device, dtype=dtype)
            for call in calls:
                conv = isinstance(module, nn.Conv2d)
                g = grad_rows(call.grad_output.to(dtype), conv=conv)[:, 0] @ q_s  # (N, T, O')
                x = call.inputs.to(dtype)
                if isinstance(module, nn.Conv2d):
                    u = unfold_patches(x, module)[:, 0]  # (N, T, C*K)
                    k = module.kernel_size[0] * module.kernel_size[1]
                    u = u.reshape(u.shape[0], u.shape[1], -1, k)  # (N, T, C, K)
                    a = torch.einsum("ntck,ci->ntik", u, q_a)
                else:
                    a = (linear_rows(x)[:, 0] @ q_a).unsqueeze(-1)  # (N, T, I, 1)
                contribution = _rotated_square_sum(g, a)
                sums[name] = contribution if name not in sums else sums[name] + contribution
    return {name: total / max(num_examples, 1) for name, total in sums.items()}
