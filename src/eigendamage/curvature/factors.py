"""Containers for Kronecker factors and their eigendecompositions.

Scale convention (fixed for every layer so that scores rank globally):

* ``A = E_n[ (1/T) sum_t a_{n,t} a_{n,t}^T ]`` -- the *mean* over examples ``n`` and over
  the ``T`` spatial locations (1 for Linear) of the outer product of the layer input ``a``
  (a conv patch for Conv2d, with a trailing constant 1 when the layer has a bias).
* ``S = E_n[ sum_t g_{n,t} g_{n,t}^T ]`` -- the mean over examples of the *sum* over
  locations of ``g = d loss_n / d output``, the gradient of the per-example loss.

With this convention ``A (x) S`` estimates the per-example Fisher ``E_n[vec(G_n) vec(G_n)^T]``
of the weight gradient ``G_n = sum_t g_{n,t} a_{n,t}^T`` (exactly, for a Linear layer
and one example), i.e. the KFC approximation of Grosse & Martens (2016).  In the row-major
order of ``weight.flatten()`` (bias as a last column) the Fisher block is ``kron(S, A)``.

For a grouped convolution (``groups > 1``) the factors carry a leading group dimension:
``A`` is ``(groups, d_in/groups, d_in/groups)`` and ``S`` is
``(groups, d_out/groups, d_out/groups)``; the Fisher is block diagonal over groups.

Layers whose ``A`` would be too large to hold densely (``collect_kfac(max_dense=...)``)
keep only its diagonal: ``A`` is then ``(d_in,)`` (``(groups, d_in/groups)``) and
``a_diagonal`` is True; the Fisher block is ``S (x) diag(A)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .types import FactorKind


@dataclass
class KFactors:
    """Kronecker factors of one layer: ``F ~= A (x) S`` (see module docstring).

    ``A``'s rows/columns follow the flattened weight's input order: for Linear
    ``in_features`` (+1 for bias); for Conv2d ``patch`` mode ``c_in/groups * kh * kw``
    in ``weight.flatten(1)`` order (+1 for bias); for Conv2d ``channel`` mode ``c_in``
    (+1 for bias), with kernel offsets counted as extra samples (EigenDamage's 1x1 Q_A).
    """

    A: torch.Tensor
    S: torch.Tensor
    kind: FactorKind
    has_bias: bool
    groups: int = 1
    num_examples: int = 0
    extra: dict = field(default_factory=dict)
    a_diagonal: bool = False
    a_count: int = 0  # rows behind A (examples x locations [x offsets]); weights a merge
    # Vectors summed into A / S (0: unknown): each factor's rank is at most this, which
    # lets eigendecompose treat factors from fewer rows than their side as low rank.
    a_rank_bound: int = 0
    s_rank_bound: int = 0

    @property
    def A_no_bias(self) -> torch.Tensor:
        """A without the trailing homogeneous (bias) coordinate."""
        if not self.has_bias:
            return self.A
        return self.A[..., :-1] if self.a_diagonal else self.A[..., :-1, :-1]

    def dense_A(self) -> torch.Tensor:
        """A as a (possibly huge) dense matrix, for consumers that need the full factor."""
        return torch.diag_embed(self.A) if self.a_diagonal else self.A


@dataclass
class Eigen:
    """Eigendecomposition ``M = Q diag(lam) Q^T`` of a symmetric PSD factor.

    ``lam`` is sorted ascending (``torch.linalg.eigh`` order) and clipped at 0.
    """

    Q: torch.Tensor
    lam: torch.Tensor


@dataclass
class KFE:
    """The Kronecker-factored eigenbasis of one layer.

    ``diag`` is the Fisher diagonal in that basis: ``lam_S[o] * lam_A[i]`` (K-FAC) or the
    EKFAC re-estimate ``E[(Q_S^T G_n Q_A)^2]`` when computed, shaped like the core weight
    ``(d_out, d_in)`` or ``(d_out, d_in, kh*kw)`` for channel-mode conv.
    """

    A: Eigen
    S: Eigen
    diag: torch.Tensor | None = None
