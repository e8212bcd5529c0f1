"""Damping escalation: retry a curvature step with more damping when a factor is singular.

Why: factors of real networks are often singular (constant input pixels, dead ReLUs, fewer
examples than dimensions).  Methods that invert them (the OBS family) then fail, and an
eigendecomposition can fail to converge on a badly conditioned one.  Relative damping
(``+ damping * mean eigenvalue``) cures both at a small, logged cost in fidelity, so a run
retries with ``damping x 10`` up to :data:`MAX_DAMPING` before giving up with an error that
names the layer.  NaN/Inf cannot be damped away: those errors are raised at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch

from ..errors import CurvatureError, SingularFactorError
from .eigen import eigendecompose
from .factors import KFE, KFactors
from .kfac import check_finite

__all__ = [
    "FIRST_DAMPING",
    "MAX_DAMPING",
    "SingularFactorError",
    "damping_may_help",
    "stable_eigendecompose",
    "with_damping_escalation",
]

FIRST_DAMPING = 1e-4  # where escalation starts from an undamped step
MAX_DAMPING = 1.0  # a damping of the mean eigenvalue: beyond it the curvature means little
FACTOR = 10.0

logger = logging.getLogger("eigendamage")
T = TypeVar("T")


def _escalations(damping: float) -> list[float]:
    """The dampings tried after ``damping`` failed, in order."""
    steps, current = [], damping
    while True:
        current = current * FACTOR if current > 0 else FIRST_DAMPING
        if current > MAX_DAMPING * (1 + 1e-9):
            return steps
        steps.append(current)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def damping_may_help(exc: BaseException) -> bool:
    """True for singular/ill-conditioned failures; NaN/Inf or empty data are not retried.

    The criteria report a failed Cholesky as a CurvatureError saying "singular", and a
    failed batched ``eigh`` as one saying "raise the damping".
    """
    if isinstance(exc, SingularFactorError | torch.linalg.LinAlgError):
        return True
    text = str(exc)
    return isinstance(exc, CurvatureError) and ("singular" in text or "raise the damping" in text)


def with_damping_escalation(step: Callable[..., T], damping: float) -> T:
    """``step(damping=damping)``; on a singular-curvature failure, again with damping x10."""
    tries = [damping, *_escalations(damping)]
    for current, following in zip(tries[:-1], tries[1:], strict=True):
        try:
            return step(damping=current)
        except (CurvatureError, torch.linalg.LinAlgError) as exc:
            if not damping_may_help(exc):
                raise
            logger.warning("%s; retrying with damping %g", _one_line(exc), following)
    try:
        return step(damping=tries[-1])
    except (CurvatureError, torch.linalg.LinAlgError) as exc:
        if not damping_may_help(exc):
            raise
        raise CurvatureError(
            f"{_one_line(exc)} [still failing with damping {tries[-1]:g}, escalated "
            f"x{FACTOR:g} from {damping:g}]; check the data for constant or duplicated inputs, "
            "or exclude that layer"
        ) from exc


def _shifted(m: torch.Tensor, damping: float, diagonal: bool) -> torch.Tensor:
    """``M + damping * mean(diag M) * I`` per (group) block: relative damping before ``eigh``
    has the same eigenvalues as :func:`~eigendamage.curvature.eigen.damped` after it.
    ``diagonal``: ``m`` holds only the diagonal (a factor kept diagonal for its size)."""
    if diagonal:
        return m + damping * m.mean(-1, keepdim=True)
    diag = m.diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return m + damping * diag.mean(-1)[..., None, None] * eye


def _finite(kfe: KFE) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (kfe.A.Q, kfe.A.lam, kfe.S.Q, kfe.S.lam))


def _layer_kfe(name: str, f: KFactors, asked: float, drop_bias: bool) -> KFE:
    """One layer's KFE, escalating the damping until ``eigh`` succeeds with finite results."""
    a_diagonal = getattr(f, "a_diagonal", False)
    plain = replace(f, A=f.A_no_bias if drop_bias else f.A, has_bias=f.has_bias and not drop_bias)

    def decompose(*, damping: float) -> KFE:
        if damping == asked:  # as asked: damp the eigenvalues after eigh
            source, after = plain, damping
        else:  # escalated: damp the matrices before eigh, where it helps convergence
            a, s = _shifted(plain.A, damping, a_diagonal), _shifted(f.S, damping, False)
            # the shift makes both factors full rank: their row counts no longer bound it
            source, after = replace(plain, A=a, S=s, a_rank_bound=0, s_rank_bound=0), 0.0
        try:
            kfe = eigendecompose({name: source}, damping=after, batched=False)[name]
        except (CurvatureError, torch.linalg.LinAlgError) as exc:
            raise SingularFactorError(
                f"layer {name!r}: eigendecomposition of its factors failed ({_one_line(exc)})"
            ) from exc
        if not _finite(kfe):
            raise SingularFactorError(f"layer {name!r}: eigendecomposition gave NaN/Inf")
        return kfe

    return with_damping_escalation(decompose, asked)


def stable_eigendecompose(
    factors: dict[str, KFactors], *, damping: float = 0.0, drop_bias: bool = False
) -> dict[str, KFE]:
    """:func:`~eigendamage.curvature.eigen.eigendecompose`, batched as usual; when that
    fails, layer by layer, escalating the damping of just the layers that need it."""
    check_finite(factors)  # NaN/Inf in the data or model: no damping helps, say where
    try:
        kfe = eigendecompose(factors, damping=damping, drop_bias=drop_bias)
    except (CurvatureError, torch.linalg.LinAlgError):
        kfe = {}
    if len(kfe) == len(factors) and all(_finite(k) for k in kfe.values()):
        return kfe
    return {n: _layer_kfe(n, f, damping, drop_bias) for n, f in factors.items()}
